"""How close one model's next-token distributions are to another's on the same tokens.

Used to measure what the lossy steps cost (re-quantized ``down_t``, sparse FFN, thresholds):
teacher-forced top-1 agreement and KL divergence against a reference, and perplexity.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import llama_cpp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Agreement:
    tokens: int
    top1: float      # fraction of positions where both models' argmax agree
    kl_mean: float   # mean KL(reference || test) in nats
    kl_max: float
    max_abs_diff: float  # largest logit difference


def logits(llm: llama_cpp.Llama, tokens: Sequence[int], *, one_at_a_time: bool = False) -> np.ndarray:
    """Logits after every token of `tokens` (evaluated from an empty context); the model must be
    created with ``logits_all=True``. `one_at_a_time` decodes token by token, as generation does
    (the sparse FFN runs only then), instead of in batches."""
    if len(tokens) > llm.n_ctx():
        raise ValueError(f"{len(tokens)} tokens do not fit the context ({llm.n_ctx()})")
    llm.reset()
    if one_at_a_time:
        for tok in tokens:
            llm.eval([tok])
    else:
        llm.eval(list(tokens))
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference: np.ndarray, test: np.ndarray) -> Agreement:
    """Agreement of `test` logits with `reference` logits, position by position."""
    if reference.shape != test.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {test.shape}")
    lp, lq = _log_softmax(reference), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = float(np.mean(reference.argmax(axis=-1) == test.argmax(axis=-1)))
    return Agreement(int(reference.shape[0]), top1, float(kl.mean()), float(kl.max()),
                     float(np.abs(reference - test).max()))


def perplexity(all_logits: np.ndarray, tokens: Sequence[int]) -> float:
    """Perplexity of tokens[1:] under the logits after tokens[:-1]."""
    lp = _log_softmax(all_logits[: len(tokens) - 1])
    nll = -lp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(nll.mean()))


def against_stock(source: str, model: str, prompt: str, n_tokens: int, **kwargs: Any) -> Agreement:
    """Agreement of `model` opened with ``powerinfer.Llama`` (a converted model, or any options in
    `kwargs`) with `source` in stock llama-cpp-python, teacher-forced over stock's greedy
    continuation of `prompt` (`n_tokens` tokens)."""
    from .llama import Llama

    stock = llama_cpp.Llama(source, logits_all=True, **kwargs)
    try:
        tokens = stock.tokenize(prompt.encode())
        n_prompt = len(tokens)
        for tok in stock.generate(list(tokens), temp=0.0):
            tokens.append(tok)
            if len(tokens) >= n_prompt + n_tokens:
                break
        reference = logits(stock, tokens)
    finally:
        stock.close()
    ours = Llama(model, logits_all=True, **kwargs)
    try:
        return compare(reference, logits(ours, tokens))
    finally:
        ours.close()
