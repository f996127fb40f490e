"""powerinfer.Llama is a llama_cpp.Llama: tokenizer, plain-kernel sampling, stats, embeddings.

Completion, chat, streaming, stop sequences, logprobs, grammars and seeds against stock are in
test_dropin.py."""
from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

import powerinfer
from conftest import THREADS


@pytest.fixture(scope="module")
def gemma_pair(gemma_path: Path):
    kw = dict(n_ctx=512, n_threads=THREADS, verbose=False, seed=7)
    stock = llama_cpp.Llama(str(gemma_path), **kw)
    ours = powerinfer.Llama(str(gemma_path), **kw)
    yield stock, ours
    stock.close()
    ours.close()


def test_is_a_llama(gemma_pair) -> None:
    _, ours = gemma_pair
    assert isinstance(ours, llama_cpp.Llama)


def test_tokenize_roundtrip(gemma_pair) -> None:
    stock, ours = gemma_pair
    text = b"Sparse neurons, dense answers."
    assert ours.tokenize(text) == stock.tokenize(text)
    assert ours.detokenize(ours.tokenize(text, add_bos=False)) == text


def test_stop_sequences_and_seeded_sampling(gemma_path: Path) -> None:
    """Sampling is sensitive to the last bit of a probability, so the reference is stock with
    the plain CPU kernels (stock's default repacks Q4_K, whose rounding differs slightly)."""
    kw = dict(use_extra_bufts=False, n_ctx=512, n_threads=THREADS, verbose=False)
    plain = powerinfer.StockLlama(str(gemma_path), **kw)
    ours = powerinfer.Llama(str(gemma_path), **kw)
    args = dict(max_tokens=24, temperature=0.8, seed=1234, stop=["."])
    # two calls each: the sampler's state carries over between calls in stock too
    expected = [plain("Once upon a time", **args)["choices"][0]["text"] for _ in range(2)]
    got = [ours("Once upon a time", **args)["choices"][0]["text"] for _ in range(2)]
    plain.close()
    ours.close()
    assert got == expected
    assert all("." not in text for text in expected)


def test_stats_count_tokens(gemma_pair) -> None:
    _, ours = gemma_pair
    ours.reset_powerinfer_stats()
    ours("Hello", max_tokens=4, temperature=0.0)
    stats = ours.powerinfer_stats()
    assert stats["ffn_graphs"] > 0 and stats["ffn_tokens"] >= stats["ffn_graphs"]
    assert stats["ffn_seconds"] > 0


def test_embeddings_match_stock(synthetic_models: dict[str, Path]) -> None:
    path = str(synthetic_models["q8_0"])
    kw = dict(n_ctx=256, n_threads=THREADS, verbose=False, embedding=True)
    stock = llama_cpp.Llama(path, **kw)
    ours = powerinfer.Llama(path, **kw)
    texts = ["the quick brown fox", "sparse neurons"]
    expected = stock.embed(texts)
    got = ours.embed(texts)
    stock.close()
    ours.close()
    assert len(got) == 2 and len(got[0]) == len(expected[0]) > 0
    assert got == expected
