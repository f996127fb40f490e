"""The dense FFN on our backend computes what stock llama.cpp computes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

import powerinfer
from conftest import THREADS

PROMPT = "the quick brown fox jumps over the lazy dog"


def _run(llm: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Logits of a prompt evaluated as one batch, then token by token, then 24 greedy tokens."""
    tokens = llm.tokenize(PROMPT.encode())
    llm.eval(tokens)
    batch_logits = np.array(llm.scores[: llm.n_tokens])
    llm.reset()
    step_logits = []
    for t in tokens:
        llm.eval([t])
        step_logits.append(np.array(llm.scores[llm.n_tokens - 1]))
    llm.reset()
    greedy = [t for _, t in zip(range(24), llm.generate(tokens, temp=0.0))]
    return batch_logits, np.array(step_logits), greedy


def _teacher_forced(llm: Any, greedy: list[int]) -> np.ndarray:
    """Logits at each step of a given greedy continuation of PROMPT (one batch)."""
    prompt = llm.tokenize(PROMPT.encode())
    tokens = prompt + greedy[:-1]
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[len(prompt) - 1: len(tokens)])


def _assert_same_greedy(ref: Any, ours: Any, ref_greedy: list[int], margin: float) -> None:
    """Ours picks the reference's greedy token at every step where the reference's top-2 gap is
    wider than `margin` (float noise may break a near-tie either way). Teacher-forced, so one
    near-tie does not hide the rest of the sequence."""
    ref_logits = _teacher_forced(ref, ref_greedy)
    our_logits = _teacher_forced(ours, ref_greedy)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin
    assert clear.sum() >= len(ref_greedy) // 2, "too many near-ties to judge"
    assert np.array_equal(our_logits.argmax(axis=1)[clear], np.array(ref_greedy)[clear])


def _open(cls: Any, path: Path, **kwargs: Any) -> Any:
    return cls(str(path), n_ctx=256, n_threads=THREADS, logits_all=True, verbose=False, **kwargs)


@pytest.mark.parametrize("wtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("on_disk", [False, True], ids=["ram", "disk"])
def test_synthetic_matches_stock_arithmetic(synthetic_models: dict[str, Path], wtype: str, on_disk: bool) -> None:
    path = synthetic_models[wtype]
    # the reference: stock's plain CPU kernels (no Q4_0/Q8_0 repacking, whose arithmetic differs)
    ref = _open(powerinfer.StockLlama, path, use_extra_bufts=False)
    ref_batch, ref_step, ref_greedy = _run(ref)
    ref.close()

    ours = _open(powerinfer.Llama, path, ffn_on_disk=on_disk, use_extra_bufts=False)
    batch, step, greedy = _run(ours)
    stats = ours.powerinfer_stats()
    ours.close()

    # single tokens: our kernels, vec_dot arithmetic; batches: ggml's CPU kernels. Identical.
    np.testing.assert_array_equal(step, ref_step)
    np.testing.assert_array_equal(batch, ref_batch)
    assert greedy == ref_greedy
    # the FFN really ran on our backend: three matmuls per layer per graph
    assert stats["ffn_matmuls"] == 3 * stats["ffn_graphs"] > 0
    assert stats["ffn_weight_bytes"] > 0
    if on_disk:
        assert stats["ffn_resident_bytes"] == 0
        assert stats["ffn_bytes_read"] >= stats["ffn_weight_bytes"]
    else:
        assert stats["ffn_resident_bytes"] >= stats["ffn_weight_bytes"]
        assert stats["ffn_bytes_read"] == 0


@pytest.mark.parametrize("wtype", ["f16", "q8_0", "q4_0"])
def test_synthetic_matches_default_stock(synthetic_models: dict[str, Path], wtype: str) -> None:
    """Against stock's default configuration: in RAM mode the FFN weights are repacked exactly
    where stock repacks them, so every logit is identical."""
    path = synthetic_models[wtype]
    ref = _open(llama_cpp.Llama, path)
    ref_batch, ref_step, ref_greedy = _run(ref)
    ref.close()
    ours = _open(powerinfer.Llama, path)
    batch, step, greedy = _run(ours)
    ours.close()
    np.testing.assert_array_equal(step, ref_step)
    np.testing.assert_array_equal(batch, ref_batch)
    assert greedy == ref_greedy


def test_gemma_matches_default_stock(gemma_path: Path) -> None:
    """Gemma 3 270M (GeGLU, Q4_K_M: Q4_K and Q6_K) against stock in its default configuration."""
    ref = _open(llama_cpp.Llama, gemma_path)
    ref_batch, ref_step, ref_greedy = _run(ref)
    ref.close()
    ours = _open(powerinfer.Llama, gemma_path)
    batch, step, greedy = _run(ours)
    stats = ours.powerinfer_stats()
    ours.close()
    np.testing.assert_array_equal(step, ref_step)
    np.testing.assert_array_equal(batch, ref_batch)
    assert greedy == ref_greedy
    assert stats["ffn_matmuls"] == 3 * stats["ffn_graphs"] > 0


@pytest.fixture(scope="module")
def gemma_reference(gemma_path: Path) -> dict[str, Any]:
    """Stock's default run, and how far stock's own plain kernels land from it (the noise)."""
    ref = _open(llama_cpp.Llama, gemma_path)
    batch, step, greedy = _run(ref)
    ref.close()
    plain = _open(powerinfer.StockLlama, gemma_path, use_extra_bufts=False)
    _, plain_step, _ = _run(plain)
    plain_picks = _teacher_forced(plain, greedy).argmax(axis=1)
    plain.close()
    return {"batch": batch, "step": step, "greedy": greedy,
            "spread": float(np.abs(plain_step - step).max()),
            "plain_agreement": int((plain_picks == np.array(greedy)).sum())}


def test_gemma_disk_mode_matches_stock(gemma_path: Path, gemma_reference: dict[str, Any]) -> None:
    """Disk mode reads plain (not repacked) weights, so against stock's default it differs as
    stock's own plain kernels do: within twice that spread, agreeing with stock's greedy choices
    at least as often as stock's plain kernels (Gemma 270M at Q4_K_M has many near-ties)."""
    ours = _open(powerinfer.Llama, gemma_path, ffn_on_disk=True)
    batch, step, _ = _run(ours)
    stats = ours.powerinfer_stats()
    spread = gemma_reference["spread"]
    assert 0 < spread < 0.1 * np.abs(gemma_reference["step"]).max()
    assert np.abs(step - gemma_reference["step"]).max() <= 2 * spread
    assert np.abs(batch - gemma_reference["batch"]).max() <= 2 * spread
    greedy = np.array(gemma_reference["greedy"])
    picks = _teacher_forced(ours, gemma_reference["greedy"]).argmax(axis=1)
    assert (picks == greedy).sum() >= gemma_reference["plain_agreement"] - 1
    assert picks[0] == greedy[0]
    ours.close()
    assert stats["ffn_bytes_read"] > 0 and stats["ffn_resident_bytes"] == 0


def test_gemma_matches_stock_plain_kernels(gemma_path: Path) -> None:
    """Against stock's plain kernels, Gemma's logits are bit-identical."""
    ref = _open(powerinfer.StockLlama, gemma_path, use_extra_bufts=False)
    ref_batch, ref_step, ref_greedy = _run(ref)
    ours = _open(powerinfer.Llama, gemma_path, use_extra_bufts=False)
    batch, step, greedy = _run(ours)
    np.testing.assert_array_equal(step, ref_step)
    np.testing.assert_array_equal(batch, ref_batch)
    assert greedy == ref_greedy
    _assert_same_greedy(ref, ours, ref_greedy, margin=0.05)
    ref.close()
    ours.close()


def test_one_split_per_ffn(tiny_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    llm = powerinfer.Llama(str(tiny_model), n_ctx=128, n_threads=THREADS, verbose=True)
    llm.close()
    err = capfd.readouterr().err
    n_layer = 2
    # CPU (embeddings, attention 0) | FFN 0 | attention 1 | FFN 1 | CPU (output)
    assert f"splits = {2 * n_layer + 1}," in err
    assert "buffer type overridden to PowerInfer_RAM" in err


def test_stock_models_do_not_touch_the_backend(tiny_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Registering the backend must not change how stock models run in the same process."""
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=128, n_threads=THREADS, verbose=True)
    llm.close()
    err = capfd.readouterr().err
    assert "splits = 1," in err
    assert "overridden to PowerInfer" not in err
