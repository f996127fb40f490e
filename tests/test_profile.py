"""Activation profiling measures what the synthetic generator planted, without changing results."""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

import powerinfer
from conftest import THREADS
from powerinfer.calibration import calibration_texts, is_held_out, stdlib_docstrings
from powerinfer.testmodels import Sparsity, layer_firing_probabilities
from powerinfer.profile import ModelProfile, profile_model


@pytest.fixture(scope="module")
def small_profile(synthetic_models: dict[str, Path]) -> ModelProfile:
    return profile_model(synthetic_models["f16"], calibration_texts(), max_tokens=3072,
                         threads=THREADS, max_samples=200)


def _planted_probabilities(path: Path) -> np.ndarray:
    """Layer 0's firing probabilities, recomputed from the generator's parameters in the file."""
    reader = gguf.GGUFReader(str(path))

    def meta(key: str) -> float:
        return float(reader.fields[f"powerinfer.synthetic.{key}"].contents())

    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    sparsity = Sparsity(active_fraction=meta("active_fraction"), skew=meta("skew"))
    return layer_firing_probabilities(int(gate.shape[1]), sparsity, int(meta("seed")), 0)


def test_layer0_frequency_matches_the_planted_sparsity(small_profile: ModelProfile,
                                                       synthetic_models: dict[str, Path]) -> None:
    layer = small_profile.layers[0]
    assert layer.tokens == small_profile.tokens == 3072
    assert 0.07 < layer.frequency.mean() < 0.15  # planted: 0.10
    planted = _planted_probabilities(synthetic_models["f16"])
    assert np.corrcoef(planted, layer.frequency)[0, 1] > 0.85
    # the hottest tenth found is mostly the hottest tenth planted
    k = layer.n_ff // 10
    hot_planted = set(np.argsort(planted)[::-1][:k])
    hot_found = set(np.argsort(layer.frequency)[::-1][:k])
    assert len(hot_planted & hot_found) > 0.6 * k


def test_every_layer_sees_every_token(small_profile: ModelProfile) -> None:
    assert len(small_profile.layers) == 4
    for layer in small_profile.layers:
        assert layer.tokens == small_profile.tokens
        assert np.all(layer.both_positive <= layer.gate_positive)
        assert layer.hist.sum() == layer.tokens * layer.n_ff


def test_samples_agree_with_counts(small_profile: ModelProfile) -> None:
    layer = small_profile.layers[0]
    assert layer.samples_x.shape == (200, 512) and layer.samples_active.shape == (200, 2048)
    assert abs(layer.samples_active.mean() - layer.frequency.mean()) < 0.03
    # the bias channel of the FFN input (after RMSNorm) is what the generator put there
    assert np.all(layer.samples_x[:, 0].astype(np.float32) > 0.5 * math.sqrt(512 / 2))


def test_profiling_does_not_change_results(synthetic_models: dict[str, Path]) -> None:
    path = str(synthetic_models["q8_0"])
    profiler = powerinfer._core.Profiler(0)
    kw = dict(n_ctx=128, n_threads=THREADS, verbose=False, logits_all=True)
    observed = powerinfer.Llama(path, eval_callback=(profiler.callback_address, profiler.user_data), **kw)
    plain = powerinfer.Llama(path, **kw)
    tokens = plain.tokenize(b"the quick brown fox jumps over the lazy dog")
    for llm in (observed, plain):
        llm.eval(tokens)
    np.testing.assert_array_equal(np.array(observed.scores[: len(tokens)]), np.array(plain.scores[: len(tokens)]))
    assert profiler.n_layers == 4 and profiler.layer(0)["tokens"] == len(tokens)
    observed.close()
    plain.close()


def test_save_load_roundtrip(small_profile: ModelProfile, tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    small_profile.save(path)
    loaded = ModelProfile.load(path)
    assert loaded.tokens == small_profile.tokens and len(loaded.layers) == len(small_profile.layers)
    for a, b in zip(loaded.layers, small_profile.layers):
        np.testing.assert_array_equal(a.gate_positive, b.gate_positive)
        np.testing.assert_array_equal(a.samples_active, b.samples_active)
        np.testing.assert_array_equal(a.samples_x, b.samples_x)
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


def test_gemma_magnitudes(gemma_path: Path) -> None:
    """A GeGLU model: no exact zeros, so sparsity comes from a magnitude threshold."""
    prof = profile_model(gemma_path, calibration_texts(), max_tokens=512, threads=THREADS)
    assert len(prof.layers) == 18
    layer = prof.layers[5]
    assert layer.hist.sum() == layer.tokens * layer.n_ff > 0
    t50, t90 = layer.magnitude_threshold(0.5), layer.magnitude_threshold(0.9)
    assert 0 < t50 < t90


def test_calibration_text_is_generated_and_split() -> None:
    docs = stdlib_docstrings()
    assert len(docs) > 300 and sum(map(len, docs)) > 100_000
    train, held = list(calibration_texts()), list(calibration_texts(held_out=True))
    assert len(train) + len(held) == len(docs) and not set(train) & set(held)
    assert 0.05 < len(held) / len(docs) < 0.2
    assert all(is_held_out(t) for t in held)


def test_calibration_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cal.txt"
    path.write_text("\n\n".join(f"paragraph number {i} about sparse neurons" for i in range(50)))
    texts = list(calibration_texts(path)) + list(calibration_texts(path, held_out=True))
    assert len(texts) == 50
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        list(calibration_texts(empty))
