"""How close one model's next-token distributions are to another's on the same tokens.

Used to measure what the lossy steps cost (re-quantized ``down_t``, sparse FFN, thresholds):
teacher-forced top-1 agreement and KL divergence against a reference, and perplexity.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

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


@dataclasses.dataclass(frozen=True)
class SparseCost:
    """What sparse decode costs against dense decode of the same model, teacher-forced on text."""
    tokens: int               # positions compared (predictions of the next token)
    perplexity_dense: float
    perplexity_sparse: float
    top1: float               # fraction of positions where the argmaxes agree
    kl_mean: float            # mean KL(dense || sparse) in nats
    kl_max: float


def _window_stats(dense: np.ndarray, sparse: np.ndarray, targets: np.ndarray, rows: int = 32) -> np.ndarray:
    """Sums over positions of (nll dense, nll sparse, top-1 agreement, KL) and the max KL, in
    chunks of `rows` (a vocabulary of 262k makes whole windows of float64 too large)."""
    out = np.zeros(5)
    for r0 in range(0, len(targets), rows):
        lp = _log_softmax(dense[r0:r0 + rows].astype(np.float64))
        lq = _log_softmax(sparse[r0:r0 + rows].astype(np.float64))
        idx = np.arange(lp.shape[0]), targets[r0:r0 + rows]
        kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
        out[:4] += (-lp[idx].sum(), -lq[idx].sum(), float((lp.argmax(-1) == lq.argmax(-1)).sum()), kl.sum())
        out[4] = max(out[4], float(kl.max()))
    return out


def sparse_cost(llm: llama_cpp.Llama, set_sparse: Callable[[bool], None], texts: Iterable[str], *,
                max_tokens: int = 4096, window: int = 256, decode: bool = False,
                progress: Optional[Callable[[int], None]] = None) -> SparseCost:
    """Teacher-forced comparison of one model dense and sparse (`set_sparse` switches; one
    instance, so a large model is held once) on `texts`, each in windows of `window` tokens from
    an empty cache, until max_tokens tokens have been evaluated. The model needs
    ``logits_all=True`` and a context of at least `window`. `decode` evaluates the sparse side
    one token at a time, as generation does (the sparse FFN with its predictors runs only then);
    the dense side runs in batches."""
    sums, positions, seen = np.zeros(5), 0, 0
    for text in texts:
        tokens = llm.tokenize(text.encode("utf-8", "replace"))
        for start in range(0, len(tokens), window):
            chunk = tokens[start:start + window][: max_tokens - seen]
            if len(chunk) < 2:
                break
            set_sparse(False)
            reference = _logits32(llm, chunk[:-1])
            set_sparse(True)
            stats = _window_stats(reference, _logits32(llm, chunk[:-1], decode), np.asarray(chunk[1:]))
            sums[:4] += stats[:4]
            sums[4] = max(sums[4], stats[4])
            positions += len(chunk) - 1
            seen += len(chunk)
            if progress is not None:
                progress(len(chunk))
            if seen >= max_tokens:
                break
        if seen >= max_tokens:
            break
    set_sparse(False)
    if positions == 0:
        raise ValueError("the text produced no tokens to compare")
    n = float(positions)
    return SparseCost(positions, float(np.exp(sums[0] / n)), float(np.exp(sums[1] / n)), sums[2] / n,
                      sums[3] / n, float(sums[4]))


def _logits32(llm: llama_cpp.Llama, tokens: Sequence[int], one_at_a_time: bool = False) -> np.ndarray:
    """Logits after each token (float32: a 262k vocabulary makes float64 windows large)."""
    llm.reset()
    for batch in ([[t] for t in tokens] if one_at_a_time else [list(tokens)]):
        llm.eval(batch)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


SPARSE_MODES = ("predicted", "predictor", "oracle", "emulate")


def open_sparse_switch(model: str, mode: str = "predicted", *, source: Optional[str] = None,
                       **kwargs: Any) -> tuple[Any, Callable[[bool], None]]:
    """A converted model opened dense, and a switch to its sparse side by `mode`: "predicted"
    (the sparse engine as it decodes, ``sparse_mode`` "predicted"), "predictor" (every layer's
    predictor used), "oracle" (the engine computing every gate row: the thresholds alone), or
    "emulate": the dense engine with each
    thresholded layer's activation zeroed where |f(gate)| is at or below the file's threshold,
    through the profiler's cb_eval hook (the thresholds alone, independently of the sparse
    engine; off, the hook only observes). With `source`, the GGUF the model was converted from,
    emulation runs that instead: independent of the bundles too."""
    from .format import THRESHOLDED, FormatError, PowerInferFile, fingerprint
    from .llama import Llama

    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(SPARSE_MODES)}")
    kwargs = {"logits_all": True, "verbose": False, **kwargs}
    if mode != "emulate":
        llm = Llama(model, sparse=False, **kwargs)

        def set_mode(on: bool) -> None:
            llm.sparse_mode = mode if on else "off"

        return llm, set_mode
    from .profile import native_profiler

    pf = PowerInferFile.open(model)
    if source is not None and fingerprint(source) != pf.source_fingerprint:
        raise FormatError(f"{source} is not the model {model} was converted from")
    thresholds = {L.layer: t for L, act, t in zip(pf.layers, pf.activations, pf.activation_thresholds)
                  if act in THRESHOLDED}
    if not thresholds:
        raise ValueError(f"{model}: no thresholded (silu_threshold / gelu_threshold) layers to emulate")
    run = source if source is not None else model
    # dense: the emulation zeroes activations itself, the engine must not threshold them too (a
    # plain GGUF has no sparse mode)
    dense = {} if source is not None else {"sparse": False}
    profiler = native_profiler(run, thresholds=thresholds)
    llm = Llama(run, eval_callback=(profiler.callback_address, profiler.user_data), **dense, **kwargs)
    llm._powerinfer_emulator = profiler  # the callback's data lives as long as the model

    def set_emulate(on: bool) -> None:
        profiler.emulate = on

    return llm, set_emulate
