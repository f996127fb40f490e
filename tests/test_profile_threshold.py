"""Magnitude thresholds for silu/gelu FFNs (CATS): calibrated to a target sparsity, profiled as
active sets, learned by predictors, written by convert, and what dropping them costs."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import THREADS
from powerinfer import _core
from powerinfer import format as fmt
from powerinfer.calibration import calibration_texts
from powerinfer.predictor import TARGET_RECALL, evaluate, train_predictor
from powerinfer.profile import (ModelProfile, calibrate_thresholds, fraction_at_or_below, profile_model,
                                quantile_of_histogram)
from powerinfer.quality import SparseCost


@given(sigma=st.floats(0.3, 4.0), mu=st.floats(-20.0, 5.0), n=st.integers(2000, 20000),
       q=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_histogram_quantile(sigma: float, mu: float, n: int, q: float, seed: int) -> None:
    """The threshold read off the native |f(gate)| histogram cuts the data at the asked fraction,
    whatever the scale and spread of the magnitudes."""
    v = np.random.default_rng(seed).lognormal(mu, sigma, n).astype(np.float32)
    counts = _core.fhist(v)
    assert counts.sum() == n
    t = quantile_of_histogram(counts, q)
    assert abs(float(np.mean(v <= t)) - q) <= 0.01 + 2.0 / n
    assert abs(fraction_at_or_below(counts, t) - q) < 1e-9


def test_gate_functions() -> None:
    g = np.array([-30.0, -1.0, 0.0, 0.5, 3.0], dtype=np.float32)
    np.testing.assert_allclose(_core.glu_apply("silu", g), g / (1 + np.exp(-g.astype(np.float64))), rtol=1e-5, atol=1e-12)
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    np.testing.assert_allclose(_core.glu_apply("gelu", g), gelu, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="unknown gate function"):
        _core.glu_apply("tanh", g)


@pytest.fixture(scope="module")
def silu_profiles(synthetic_models: dict[str, Path]) -> dict[str, ModelProfile]:
    """The F16 synthetic model (a swiglu graph) at 50% |silu(gate)| sparsity: calibration on train
    text, then train and held-out profiles whose active sets are |silu(gate)| > threshold."""
    path = synthetic_models["f16"]
    thresholds = calibrate_thresholds(path, calibration_texts(part="train"), 0.5, max_tokens=1024, threads=THREADS)
    return {
        "calibration": profile_model(path, calibration_texts(part="train"), max_tokens=1024, threads=THREADS),
        "train": profile_model(path, calibration_texts(part="train"), max_tokens=3072, threads=THREADS,
                               max_samples=3072, thresholds=thresholds, target_sparsity=0.5),
        "validation": profile_model(path, calibration_texts(part="validation"), max_tokens=512, threads=THREADS,
                                    max_samples=512, thresholds=thresholds, target_sparsity=0.5),
        "held_out": profile_model(path, calibration_texts(part="held_out"), max_tokens=768, threads=THREADS,
                                  max_samples=768, thresholds=thresholds, target_sparsity=0.5),
    }


@given(target=st.floats(0.05, 0.98))
@settings(max_examples=30, deadline=None)
def test_calibrated_threshold_holds_on_held_out_text(silu_profiles: dict[str, ModelProfile], target: float) -> None:
    """A threshold calibrated on train text drops the target fraction of held-out |silu(gate)|."""
    calibration, held = silu_profiles["calibration"], silu_profiles["held_out"]
    for il, (cal, ho) in enumerate(zip(calibration.layers, held.layers)):
        assert cal.fhist.sum() == cal.tokens * cal.n_ff
        t = cal.calibrate_threshold(target)
        assert abs(fraction_at_or_below(ho.fhist, t) - target) < 0.04, (il, t)


def test_thresholded_profile_counts_and_labels(silu_profiles: dict[str, ModelProfile],
                                               synthetic_models: dict[str, Path]) -> None:
    train, held = silu_profiles["train"], silu_profiles["held_out"]
    assert train.thresholded and train.target_sparsity == 0.5
    assert train.thresholds() == held.thresholds() and len(train.thresholds()) == 4
    for layer in held.layers:
        assert abs(layer.sparsity - 0.5) < 0.04             # counted by the native profiler
        assert abs(layer.inactive_fraction("silu_threshold") - layer.sparsity) < 1e-12
        assert layer.gate_positive.mean() / layer.tokens < 0.2  # the ReLU view of the same gates: ~90% off
        assert abs(layer.samples_active.mean() - (1 - layer.sparsity)) < 0.05
    # the sample labels are |silu(x . gate_i)| > t, recomputed here from the F16 gate weights
    reader = gguf.GGUFReader(str(synthetic_models["f16"]))
    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    w = np.array(gate.data, dtype=np.float32).reshape(int(gate.shape[1]), int(gate.shape[0]))
    layer = train.layers[0]
    g = layer.samples_x.astype(np.float32) @ w.T
    mine = np.abs(_core.glu_apply("silu", g.ravel()).reshape(g.shape)) > layer.threshold
    assert np.mean(mine == layer.samples_active) > 0.995  # f16 inputs vs the graph's f32 ones


def test_predictor_learns_thresholded_labels(silu_profiles: dict[str, ModelProfile]) -> None:
    """On a silu layer at 50%, about half the neurons are active, mostly neurons whose gate is
    negative (not a ReLU active set); the predictor keeps its recall target on held-out text."""
    train, val, held = (silu_profiles[k].layers[0] for k in ("train", "validation", "held_out"))
    pred, q_val = train_predictor(train.samples_x, train.samples_active, rank=64, x_val=val.samples_x,
                                  active_val=val.samples_active)
    assert q_val.recall >= TARGET_RECALL - 0.001  # set on the validation samples
    q = evaluate(pred, held.samples_x, held.samples_active)
    assert 0.4 < q.true_fraction < 0.6
    assert q.recall >= 0.98
    assert q.predicted_fraction < 0.9  # it does better than computing everything


def test_save_load_keeps_thresholds(silu_profiles: dict[str, ModelProfile], tmp_path: Path) -> None:
    silu_profiles["held_out"].save(tmp_path / "p.npz")
    loaded = ModelProfile.load(tmp_path / "p.npz")
    assert loaded.target_sparsity == 0.5 and loaded.thresholds() == silu_profiles["held_out"].thresholds()
    for a, b in zip(loaded.layers, silu_profiles["held_out"].layers):
        np.testing.assert_array_equal(a.fhist, b.fhist)
        np.testing.assert_array_equal(a.above, b.above)
    # a profile saved before thresholds existed still loads, unthresholded
    with np.load(tmp_path / "p.npz") as z:
        old = {k: z[k] for k in z.files if not k.endswith((".fhist", ".above", ".threshold", "target_sparsity"))}
    np.savez(tmp_path / "old.npz", **old)
    legacy = ModelProfile.load(tmp_path / "old.npz")
    assert not legacy.thresholded and not legacy.layers[0].thresholded
    np.testing.assert_array_equal(legacy.layers[0].frequency, legacy.layers[0].gate_positive / legacy.layers[0].tokens)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "powerinfer", *args], capture_output=True, text=True, timeout=900)


def test_cli_convert_with_a_target_sparsity(synthetic_models: dict[str, Path], tmp_path: Path) -> None:
    src, out = str(synthetic_models["q8_0"]), tmp_path / "silu.gguf"
    proc = _cli("convert", src, str(out), "--activation", "silu_threshold", "--target-sparsity", "0.7",
                "--tokens", "2048", "--samples", "2048", "-t", str(THREADS), "--quiet")
    assert proc.returncode == 0, proc.stderr
    pf = fmt.PowerInferFile.open(out)
    assert set(pf.activations) == {"silu_threshold"}
    assert all(t > 0 for t in pf.activation_thresholds)
    for i, L in enumerate(pf.layers):
        assert abs(pf.activation_sparsity[i] - 0.7) < 0.05  # measured on held-out text
        assert abs(float(pf.frequency(i).mean()) - 0.3) < 0.05  # hot-first order of thresholded activity
        assert pf.predictors[i]["recall"] >= 0.98
    assert "|silu(gate)| >" in proc.stdout and "held-out sparsity" in proc.stdout


def test_cli_target_sparsity_errors(synthetic_models: dict[str, Path], profiles: dict[str, ModelProfile],
                                    tmp_path: Path) -> None:
    src = str(synthetic_models["q8_0"])
    proc = _cli("convert", src, str(tmp_path / "o.gguf"), "--target-sparsity", "0.5", "--quiet")
    assert proc.returncode == 1 and "ReLU-family" in proc.stderr  # the file declares relu
    proc = _cli("convert", src, str(tmp_path / "o.gguf"), "--activation", "gelu_threshold", "--quiet")
    assert proc.returncode == 1 and "silu_threshold, not gelu_threshold" in proc.stderr
    proc = _cli("convert", src, str(tmp_path / "o.gguf"), "--activation", "silu_threshold",
                "--target-sparsity", "1.5", "--quiet")
    assert proc.returncode == 1 and "[0, 1)" in proc.stderr
    prof = tmp_path / "p.npz"
    profiles["q8_0"].save(prof)  # made without thresholds
    proc = _cli("convert", src, str(tmp_path / "o.gguf"), "--activation", "silu_threshold", "--profile", str(prof),
                "--no-predictors", "--quiet")
    assert proc.returncode == 1 and "--target-sparsity 0.5" in proc.stderr  # the default target
    assert not list(tmp_path.glob("o.gguf*"))


def test_cli_profile_then_convert(synthetic_models: dict[str, Path], tmp_path: Path) -> None:
    src, prof = str(synthetic_models["f16"]), tmp_path / "p.npz"
    proc = _cli("profile", src, "--target-sparsity", "0.6", "--tokens", "1024", "-t", str(THREADS), "-o", str(prof),
                "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "|f(gate)| threshold" in proc.stdout
    assert ModelProfile.load(prof).target_sparsity == pytest.approx(0.6)
    proc = _cli("convert", src, str(tmp_path / "o.gguf"), "--profile", str(prof), "--no-predictors", "--quiet")
    assert proc.returncode == 1 and "without --target-sparsity" in proc.stderr  # relu needs gate > 0 counts
    proc = _cli("convert", src, str(tmp_path / "o.gguf"), "--activation", "silu_threshold", "--target-sparsity",
                "0.6", "--profile", str(prof), "--no-predictors", "--tokens", "1024", "-t", str(THREADS), "--quiet")
    assert proc.returncode == 0, proc.stderr
    pf = fmt.PowerInferFile.open(tmp_path / "o.gguf")
    assert pf.activation_thresholds == pytest.approx([t for _, t in sorted(ModelProfile.load(prof).thresholds().items())])
    assert all(abs(s - 0.6) < 0.06 for s in pf.activation_sparsity)


@pytest.fixture(scope="module")
def deep_silu(synthetic_models: dict[str, Path], silu_profiles: dict[str, ModelProfile],
              tmp_path_factory: pytest.TempPathFactory) -> fmt.PowerInferFile:
    """The F16 model as silu_threshold at 97%: past its planted ReLU sparsity (90%), so the
    thresholds cut real activations. (At 50% they would not: its |silu(gate)| median is ~1e-29.)"""
    train = silu_profiles["train"]
    deep = {il: layer.calibrate_threshold(0.97) for il, layer in enumerate(silu_profiles["calibration"].layers)}
    out = tmp_path_factory.mktemp("deep") / "deep.gguf"
    return fmt.convert(synthetic_models["f16"], out, train.frequencies(), activation="silu_threshold", thresholds=deep)


def _cost(path: str, mode: str, source: Path | None = None) -> SparseCost:
    from powerinfer.quality import open_sparse_switch, sparse_cost

    llm, set_sparse = open_sparse_switch(path, mode, source=None if source is None else str(source), n_ctx=128,
                                         n_threads=THREADS)
    try:
        return sparse_cost(llm, set_sparse, calibration_texts(part="held_out"), max_tokens=256, window=128,
                           decode=mode != "emulate")
    finally:
        llm.close()


def test_emulated_thresholds(synthetic_models: dict[str, Path], silu_profiles: dict[str, ModelProfile],
                             deep_silu: fmt.PowerInferFile, tmp_path: Path) -> None:
    """Zeroing thresholded-out activations through the observer: at threshold 0 nothing changes
    (bit for bit); at 97% the logits move, on the converted file as on its (F16) source."""
    from powerinfer.quality import open_sparse_switch

    zero = fmt.convert(synthetic_models["f16"], tmp_path / "zero.gguf", silu_profiles["train"].frequencies(),
                       activation="silu_threshold", thresholds={il: 0.0 for il in range(4)})
    src = synthetic_models["f16"]
    unchanged, deep, on_source = _cost(zero.path, "emulate"), _cost(deep_silu.path, "emulate"), \
        _cost(deep_silu.path, "emulate", src)
    assert unchanged.kl_max == 0.0 and unchanged.top1 == 1.0
    assert unchanged.perplexity_sparse == unchanged.perplexity_dense
    assert deep.kl_mean > 0.0 and deep.top1 < 1.0 and deep.tokens == unchanged.tokens > 200
    assert abs(math.log(on_source.perplexity_sparse / deep.perplexity_sparse)) < 0.01
    relu = fmt.convert(synthetic_models["f16"], tmp_path / "relu.gguf", silu_profiles["train"].frequencies())
    with pytest.raises(ValueError, match="no thresholded"):
        open_sparse_switch(relu.path, "emulate", n_ctx=128)
    with pytest.raises(fmt.FormatError, match="not the model"):
        open_sparse_switch(deep_silu.path, "emulate", source=str(synthetic_models["q8_0"]), n_ctx=128)


def test_sparse_engine_applies_the_thresholds(deep_silu: fmt.PowerInferFile) -> None:
    """The sparse engine's oracle decode (every gate row, |silu(g)| > t) costs what the
    emulation measures: two implementations of the same thresholded activation."""
    emulated, oracle = _cost(deep_silu.path, "emulate"), _cost(deep_silu.path, "oracle")
    assert oracle.kl_mean > 0.0 and oracle.tokens == emulated.tokens
    assert abs(math.log(oracle.perplexity_sparse / emulated.perplexity_sparse)) < 0.02
    assert abs(oracle.top1 - emulated.top1) < 0.03


def test_gemma_calibration(gemma_path: Path) -> None:
    """Gemma 3 (geglu): thresholds calibrated on train text hold on held-out text."""
    thresholds = calibrate_thresholds(gemma_path, calibration_texts(part="train"), 0.5, max_tokens=512,
                                      threads=THREADS)
    assert len(thresholds) == 18 and all(0.02 < t < 0.5 for t in thresholds.values())
    held = profile_model(gemma_path, calibration_texts(part="held_out"), max_tokens=256, threads=THREADS,
                         thresholds=thresholds, target_sparsity=0.5)
    for layer in held.layers:
        assert abs(layer.sparsity - 0.5) < 0.05
        assert math.isclose(layer.inactive_fraction("gelu_threshold"), layer.sparsity)
