"""Import of models in PowerInfer's own format (magic PWRI): predictors and down_t are carried
over without training or re-quantization."""
from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import powerinfer
from conftest import THREADS
from powerinfer import _core, pwri
from powerinfer import format as fmt
from powerinfer.cli import main
from powerinfer.testmodels import write_pwri_test_model


@pytest.fixture(scope="module")
def pwri_file(synthetic_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pwri_test_model(synthetic_models["q8_0"], tmp_path_factory.mktemp("pwri") / "m.pwri.gguf")


@pytest.fixture(scope="module")
def imported(pwri_file: Path) -> fmt.PowerInferFile:
    out = pwri_file.with_name("imported.gguf")
    assert main(["convert", str(pwri_file), str(out), "--tokens", "1024", "--quiet", "-t", str(THREADS)]) == 0
    return fmt.PowerInferFile.open(out)


def test_stock_llama_cpp_cannot_read_pwri(pwri_file: Path) -> None:
    assert open(pwri_file, "rb").read(4) == b"PWRI"
    with pytest.raises(ValueError):
        llama_cpp.Llama(str(pwri_file), verbose=False)


def test_plain_gguf_rebuilds_ffn_down(synthetic_models: dict[str, Path], pwri_file: Path, tmp_path: Path) -> None:
    plain = pwri.to_plain_gguf(pwri_file, tmp_path / "plain.gguf")
    names = {t["name"] for t in _core.read_gguf_header(str(plain), [])["tensors"]}
    assert "blk.0.ffn_down.weight" in names and not any("fc1" in n or "down_t" in n for n in names)
    llm = llama_cpp.Llama(str(plain), n_ctx=128, n_threads=THREADS, verbose=False)
    stock = llama_cpp.Llama(str(synthetic_models["q8_0"]), n_ctx=128, n_threads=THREADS, verbose=False)
    a = llm.create_completion("hello", max_tokens=8, temperature=0)["choices"][0]["text"]
    b = stock.create_completion("hello", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert a == b


def test_import_carries_predictors_and_down_t(pwri_file: Path, imported: fmt.PowerInferFile) -> None:
    assert imported.source_fingerprint == fmt.fingerprint(pwri_file)
    assert set(imported.activations) == {"relu"}
    assert imported.down_requant_error == [0.0] * 4  # the file's own down_t, bytes untouched
    source_preds = pwri.predictors(pwri_file)
    source_down = pwri.down_t_rows(pwri_file)
    for i, L in enumerate(imported.layers):
        perm = imported.permutation(i)
        p, q = imported.predictor(i), source_preds[L.layer]
        assert p.threshold == q.threshold == 0.0
        np.testing.assert_allclose(p.fc1, q.fc1.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(p.fc2, q.fc2[:, perm].astype(np.float16).astype(np.float32))
        _, _, down_t = imported.bundle_rows(i)
        want = source_down[L.layer][1].reshape(L.n_ff, -1)[perm]
        assert np.array_equal(down_t, want)
        assert 0.0 <= imported.predictors[i]["recall"] <= 1.0  # measured on held-out samples


def test_imported_model_generates_like_the_source(synthetic_models: dict[str, Path],
                                                   imported: fmt.PowerInferFile) -> None:
    kw = dict(n_ctx=128, n_threads=THREADS, verbose=False)
    stock = llama_cpp.Llama(str(synthetic_models["q8_0"]), **kw)
    want = stock.create_completion("The quick", max_tokens=12, temperature=0)["choices"][0]["text"]
    # dense: the imported bundles are the source model (its synthetic SVD predictors are not
    # meant to be good; their held-out quality is what `inspect` reports)
    pi = powerinfer.Llama(imported.path, sparse=False, **kw)
    assert pi.create_completion("The quick", max_tokens=12, temperature=0)["choices"][0]["text"] == want


def test_corrupt_pwri_is_refused(pwri_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(pwri_file.read_bytes()[:2000])
    assert main(["convert", str(bad), str(tmp_path / "out.gguf"), "--quiet"]) == 1
    assert not (tmp_path / "out.gguf").exists()
