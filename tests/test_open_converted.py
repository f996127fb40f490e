"""powerinfer.Llama opens converted models: the FFN comes from the neuron bundles, and the dense
result matches the source model in stock llama-cpp-python."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import powerinfer
from conftest import THREADS
from powerinfer import format as fmt
from powerinfer import quality
from powerinfer.profile import ModelProfile

PROMPT = "The quick brown fox"
KW = dict(n_ctx=256, n_threads=THREADS, verbose=False, seed=0)


def _short_and_long_batch(llm: powerinfer.Llama, tokens: list[int], n_short: int,
                          counter: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the first `n_short` tokens as one batch, which must not touch the stats
    `counter`, then of all `tokens` as one batch, which must."""
    llm.reset_powerinfer_stats()
    short = quality.logits(llm, tokens[:n_short])
    assert llm.powerinfer_stats()[counter] == 0
    full = quality.logits(llm, tokens)
    assert llm.powerinfer_stats()[counter] > 0
    return short, full


def _against_stock(source: Path, converted: str, n: int = 32) -> quality.Agreement:
    return quality.against_stock(str(source), converted, PROMPT, n, **KW)


@pytest.fixture(scope="module")
def converted_silu(synthetic_models: dict[str, Path], profiles: dict[str, ModelProfile],
                   tmp_path_factory: pytest.TempPathFactory) -> fmt.PowerInferFile:
    """The F16 model converted as what its graph computes (silu): dense is the source model."""
    out = tmp_path_factory.mktemp("converted_silu") / "f16-silu.gguf"
    return fmt.convert(synthetic_models["f16"], out, profiles["f16"].frequencies(), activation="silu_threshold")


def test_f16_graph_activation_matches_stock(synthetic_models: dict[str, Path],
                                            converted_silu: fmt.PowerInferFile) -> None:
    """F16 bundles hold the source's exact weights: only the summation order of down differs."""
    agree = _against_stock(synthetic_models["f16"], converted_silu.path)
    assert agree.top1 == 1.0
    assert agree.max_abs_diff < 0.05  # logits have std ~8
    assert agree.kl_max < 1e-4


@pytest.mark.parametrize("wtype,min_top1,max_kl", [("f16", 1.0, 1e-3), ("q8_0", 0.95, 1e-2), ("q4_0", 0.9, 0.1)])
def test_relu_models_match_stock(synthetic_models: dict[str, Path], converted: dict[str, fmt.PowerInferFile],
                                 wtype: str, min_top1: float, max_kl: float) -> None:
    """The synthetic models declare relu; the backend computes relu exactly where stock's graph
    computes silu(64 g)/64 (equal to within 0.28|u|/64), and Q4_0's down_t is re-quantized to
    Q5_0 (4% relative RMS): greedy choices agree within those errors."""
    pf = converted[wtype]
    assert set(pf.activations) == {"relu"}
    agree = _against_stock(synthetic_models[wtype], pf.path)
    assert agree.top1 >= min_top1, agree
    assert agree.kl_mean <= max_kl, agree


def test_long_batches_transpose_down_back(synthetic_models: dict[str, Path],
                                          converted_silu: fmt.PowerInferFile) -> None:
    """Batches of >= 64 tokens of layers with dense activations multiply down transposed back to
    ffn_down's layout (F16 exactly) with ggml's kernels: as close to stock as a short batch."""
    source = synthetic_models["f16"]
    stock = llama_cpp.Llama(str(source), logits_all=True, **KW)
    try:
        tokens = stock.tokenize(b"The quick brown fox jumps over the lazy dog " * 10)[:80]
        assert len(tokens) == 80
        reference = quality.logits(stock, tokens)
    finally:
        stock.close()
    llm = powerinfer.Llama(converted_silu.path, logits_all=True, **KW)
    try:
        short, long = _short_and_long_batch(llm, tokens, 40, "down_transposes")
    finally:
        llm.close()
    base = quality.compare(reference[:40], short)
    agree = quality.compare(reference, long)
    assert agree.top1 == 1.0, agree
    assert agree.max_abs_diff < max(2 * base.max_abs_diff, 0.05), (agree, base)
    assert agree.kl_max < 1e-4, agree


def test_same_greedy_text(synthetic_models: dict[str, Path], converted_silu: fmt.PowerInferFile) -> None:
    stock = llama_cpp.Llama(str(synthetic_models["f16"]), **KW)
    want = stock.create_completion(PROMPT, max_tokens=48, temperature=0)["choices"][0]["text"]
    stock.close()
    pi = powerinfer.Llama(converted_silu.path, **KW)
    assert pi.is_powerinfer_model
    assert pi.create_completion(PROMPT, max_tokens=48, temperature=0)["choices"][0]["text"] == want
    stats = pi.powerinfer_stats()
    assert stats["ffn_matmuls"] > 0
    assert stats["ffn_resident_bytes"] >= stats["ffn_weight_bytes"] > 0
    pi.close()


def test_gemma_converted_matches_stock(gemma_path: Path, tmp_path: Path) -> None:
    from powerinfer.calibration import calibration_texts
    from powerinfer.profile import profile_model

    prof = profile_model(gemma_path, calibration_texts(), max_tokens=128, threads=THREADS)
    pf = fmt.convert(gemma_path, tmp_path / "g.gguf", prof.frequencies())
    assert set(pf.activations) == {"gelu_threshold"}
    # a batch of more than 64 tokens: down transposed back and re-quantized to Q8_0 for ggml
    agree = _against_stock(gemma_path, pf.path, n=72)
    # down_t in Q8_0 (0.5% relative RMS against the source's Q6_K/Q4_K down)
    assert agree.top1 >= 0.95, agree
    assert agree.kl_mean < 0.02, agree


def test_truncated_bundles_fail_cleanly(converted: dict[str, fmt.PowerInferFile], tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    shutil.copyfile(converted["q8_0"].path, bad)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) - 3 * 4096)
    with pytest.raises(powerinfer.ModelFileError, match="truncated"):
        powerinfer.Llama(str(bad), **KW)


def test_disk_mode_of_a_converted_model_is_refused_clearly(converted: dict[str, fmt.PowerInferFile]) -> None:
    with pytest.raises(powerinfer.ModelFileError, match="neuron cache"):
        powerinfer.Llama(converted["q8_0"].path, ffn_on_disk=True, **KW)


def test_prompt_batches_repack_gate_and_up(converted: dict[str, fmt.PowerInferFile]) -> None:
    """A batch of >= 32 tokens multiplies gate/up repacked into ggml's interleaved blocks (the
    file keeps them plain for sparse rows). Batches and token-by-token decode differ by float
    noise on this Q4_0 model (another summation order throughout); the repacked batch must not
    differ more than a batch just below the repack threshold does."""
    llm = powerinfer.Llama(converted["q4_0"].path, logits_all=True, sparse=False, **KW)
    try:
        tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog " * 6)[:48]
        assert len(tokens) == 48
        single = quality.logits(llm, tokens, one_at_a_time=True)
        plain, repacked = _short_and_long_batch(llm, tokens, 31, "batch_repacks")
    finally:
        llm.close()
    base = quality.compare(single[:31], plain)
    agree = quality.compare(single[:31], repacked[:31])
    assert agree.top1 == 1.0, agree
    # KL of float noise on confident logits is ~1e-5: a ratio of two such values is itself noisy
    assert agree.kl_mean <= max(2 * base.kl_mean, 1e-4), (agree, base)
    # the integer down kernel rounds each coefficient to a power-of-two grid, so activations that
    # differ by float noise (repacked gate/up) can round differently: measured 0.033 on logits
    # within +-61 (KL 7e-7), where a plain batch differs by 0.007; a wrong repack moves logits
    # by whole units
    assert agree.max_abs_diff <= 2 * base.max_abs_diff + 0.05, (agree, base)
