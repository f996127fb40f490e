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
# long enough (>= 32 tokens) that prompt batches take the paths big batches take
LONG_PROMPT = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun " * 3


def _run(llm: Any, prompt: str = PROMPT) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Logits of a prompt evaluated as one batch, then token by token, then 24 greedy tokens."""
    tokens = llm.tokenize(prompt.encode())
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


def _open(cls: Any, path: Path, **kwargs: Any) -> Any:
    return cls(str(path), n_ctx=256, n_threads=THREADS, logits_all=True, verbose=False, **kwargs)


def _assert_identical(path: Path, ref_cls: Any, ref_kwargs: dict[str, Any], our_kwargs: dict[str, Any],
                      prompt: str = PROMPT) -> dict[str, Any]:
    """Ours and the reference give the same logits, bit for bit, and the same greedy tokens.
    Returns our backend's counters."""
    ref = _open(ref_cls, path, **ref_kwargs)
    ref_batch, ref_step, ref_greedy = _run(ref, prompt)
    ref.close()
    ours = _open(powerinfer.Llama, path, **our_kwargs)
    batch, step, greedy = _run(ours, prompt)
    stats = ours.powerinfer_stats()
    ours.close()
    np.testing.assert_array_equal(step, ref_step)
    np.testing.assert_array_equal(batch, ref_batch)
    assert greedy == ref_greedy
    # the FFN really ran on our backend: three matmuls per layer per graph
    assert stats["ffn_matmuls"] == 3 * stats["ffn_graphs"] > 0
    return stats


@pytest.mark.parametrize("wtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("on_disk", [False, True], ids=["ram", "disk"])
def test_synthetic_matches_stock_arithmetic(synthetic_models: dict[str, Path], wtype: str, on_disk: bool) -> None:
    """Against stock's plain CPU kernels (no repacking). In disk mode single tokens run the
    backend's own kernels (vec_dot arithmetic); everything else runs ggml's kernels."""
    stats = _assert_identical(synthetic_models[wtype], powerinfer.StockLlama, {"use_extra_bufts": False},
                              {"ffn_on_disk": on_disk, "use_extra_bufts": False}, LONG_PROMPT)
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
    _assert_identical(synthetic_models[wtype], llama_cpp.Llama, {}, {})


def test_gemma_matches_default_stock(gemma_path: Path) -> None:
    """Gemma 3 270M (GeGLU, Q4_K_M: Q4_K and Q6_K) against stock in its default configuration."""
    _assert_identical(gemma_path, llama_cpp.Llama, {}, {})


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


@pytest.mark.parametrize("on_disk", [False, True], ids=["ram", "disk"])
def test_gemma_matches_stock_plain_kernels(gemma_path: Path, on_disk: bool) -> None:
    """Against stock's plain kernels, Gemma's logits are bit-identical in both modes."""
    _assert_identical(gemma_path, powerinfer.StockLlama, {"use_extra_bufts": False},
                      {"ffn_on_disk": on_disk, "use_extra_bufts": False})


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
