"""powerinfer convert: neuron bundles, hot-first, 4 KiB aligned halves, no FFN stored twice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

import powerinfer
from conftest import THREADS
from powerinfer import _core
from powerinfer import format as fmt
from powerinfer.calibration import calibration_texts
from powerinfer.profile import ModelProfile, profile_model


def _source_rows(path: Path, name: str) -> tuple[gguf.ReaderTensor, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    return t, np.asarray(reader.data[int(t.data_offset):int(t.data_offset) + int(t.n_bytes)])


# Q4_0's down_t is re-quantized to Q5_0 by columns; the synthetic down rows carry the hidden
# spectrum (dimension k ~ k^-0.75), so a column's first blocks span a wide range: 0.070 measured
@pytest.mark.parametrize("wtype,max_err", [("f16", 0.0), ("q8_0", 0.01), ("q4_0", 0.08)])
def test_bundles_hold_the_source_ffn(synthetic_models: dict[str, Path], converted: dict[str, fmt.PowerInferFile],
                                     wtype: str, max_err: float) -> None:
    pf = converted[wtype]
    assert [L.layer for L in pf.layers] == [0, 1, 2, 3]
    for i, L in enumerate(pf.layers):
        perm = pf.permutation(i)
        assert sorted(perm.tolist()) == list(range(L.n_ff))
        inverse = np.argsort(perm)
        gate, up, down_t = pf.bundle_rows(i)
        for name, rows in (("gate", gate), ("up", up)):
            _, src = _source_rows(synthetic_models[wtype], f"blk.{L.layer}.ffn_{name}.weight")
            assert np.array_equal(rows[inverse], src.reshape(L.n_ff, -1))  # bytes, untouched
        t, src = _source_rows(synthetic_models[wtype], f"blk.{L.layer}.ffn_down.weight")
        want = _core.dequantize_rows(int(t.tensor_type), src, L.n_ff).T
        got = _core.dequantize_rows(L.down_type, down_t.reshape(-1), L.n_embd)[inverse]
        rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2))
        assert rel <= max_err
        assert abs(rel - pf.down_requant_error[i]) < 1e-4  # the reported error is the real one


def test_hot_first_and_aligned(converted: dict[str, fmt.PowerInferFile]) -> None:
    for pf in converted.values():
        for i, L in enumerate(pf.layers):
            f = pf.frequency(i)
            assert np.all(np.diff(f) <= 0)  # hottest neurons first
            for c in range(L.n_clusters):
                assert (pf.region_offset + L.gate_half(c)) % 4096 == 0
                assert (pf.region_offset + L.updown_half(c)) % 4096 == 0
            assert L.gate_half_bytes >= L.cluster * L.gate_row_bytes


def test_disk_footprint(synthetic_models: dict[str, Path], converted: dict[str, fmt.PowerInferFile]) -> None:
    for wtype, pf in converted.items():
        on_disk = os.stat(pf.path).st_blocks * 512
        assert on_disk <= 1.15 * os.path.getsize(synthetic_models[wtype])


def test_stock_llama_cpp_refuses_the_file(converted: dict[str, fmt.PowerInferFile]) -> None:
    with pytest.raises(ValueError):
        llama_cpp.Llama(converted["f16"].path, verbose=False)


def test_down_t_types(converted: dict[str, fmt.PowerInferFile]) -> None:
    """Exact types keep the source type; 4-bit types get one more bit (see format.down_t_type)."""
    Q = gguf.GGMLQuantizationType
    assert {w: Q(pf.layers[0].down_type).name for w, pf in converted.items()} == \
        {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q5_0"}


def test_identity_recorded(synthetic_models: dict[str, Path], converted: dict[str, fmt.PowerInferFile]) -> None:
    pf = converted["q8_0"]
    assert pf.source_architecture == "llama"
    assert pf.source_fingerprint == fmt.fingerprint(synthetic_models["q8_0"])
    assert len(pf.source_sha256) == 64


def test_interrupt_leaves_no_output(synthetic_models: dict[str, Path], profiles: dict[str, ModelProfile],
                                    tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fmt.convert(synthetic_models["f16"], tmp_path / "out.gguf", profiles["f16"].frequencies(), progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_clear_errors(synthetic_models: dict[str, Path], converted: dict[str, fmt.PowerInferFile],
                      profiles: dict[str, ModelProfile], tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(fmt.FormatError, match="already a PowerInfer model"):
        fmt.convert(converted["f16"].path, tmp_path / "x.gguf", profiles["f16"].frequencies())
    with pytest.raises(fmt.FormatError, match="made for this model"):
        fmt.convert(tiny_model, tmp_path / "x.gguf", profiles["f16"].frequencies())
    with pytest.raises(fmt.FormatError, match="not a PowerInfer model"):
        fmt.PowerInferFile.open(synthetic_models["f16"])
    cut = tmp_path / "cut.gguf"
    data = Path(converted["q8_0"].path).read_bytes()
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(fmt.FormatError, match="truncated"):
        fmt.PowerInferFile.open(cut)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("x.gguf")]


def test_cli_convert_refuses_a_profile_of_another_model(synthetic_models: dict[str, Path],
                                                        profiles: dict[str, ModelProfile], tmp_path: Path) -> None:
    prof = tmp_path / "p.npz"
    profiles["q8_0"].save(prof)
    proc = subprocess.run([sys.executable, "-m", "powerinfer", "convert", str(synthetic_models["f16"]),
                           str(tmp_path / "o.gguf"), "--profile", str(prof), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "another model" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "powerinfer", "convert", str(synthetic_models["q8_0"]),
                           str(tmp_path / "o.gguf"), "--profile", str(prof), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no samples" in proc.stderr  # predictors need samples
    proc = subprocess.run([sys.executable, "-m", "powerinfer", "convert", str(synthetic_models["q8_0"]),
                           str(tmp_path / "o.gguf"), "--profile", str(prof), "--no-predictors", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "powerinfer", "inspect", str(tmp_path / "o.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "bundled layers" in proc.stdout


def test_gemma_converts(gemma_path: Path, tmp_path: Path) -> None:
    """K-quant rows of 640 elements do not exist: Gemma's down_t falls back to Q8_0."""
    prof = profile_model(gemma_path, calibration_texts(), max_tokens=128, threads=THREADS)
    pf = fmt.convert(gemma_path, tmp_path / "g.gguf", prof.frequencies(), profile_tokens=prof.tokens)
    assert len(pf.layers) == 18
    assert all(L.down_type == int(gguf.GGMLQuantizationType.Q8_0) for L in pf.layers)
    assert max(pf.down_requant_error) < 0.02
    assert os.stat(pf.path).st_blocks * 512 <= 1.15 * os.path.getsize(gemma_path)
