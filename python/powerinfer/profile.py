"""Activation profiling: how often each FFN neuron fires, per layer, on calibration text.

The model runs densely through ``powerinfer.Llama`` with a native ``cb_eval`` observer
(``_core.Profiler``) that reads each layer's FFN input, gate and activation as they are
computed; results are the same as without it. Recorded per layer:

* ``gate_positive``: tokens where the gate pre-activation was > 0 (active under ReLU);
* ``both_positive``: tokens where gate and up were both > 0 (active under dReLU);
* ``abs_act_mean``: mean |activation| (what multiplies ffn_down) per neuron;
* ``hist``: a log2 histogram of |activation| over all neurons;
* ``fhist``: a finer histogram of |f(gate)|, f being the graph's silu or gelu: magnitude
  thresholds (CATS) are calibrated on it (``calibrate_threshold``);
* given per-layer thresholds (a second pass, after calibration): ``above``, the tokens where
  |f(gate)| > threshold, the active set of a thresholded silu/gelu layer;
* optional samples of (FFN input, active set) for training predictors; the active set is
  |f(gate)| > threshold on thresholded layers, else gate > 0.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import _core
from .format import THRESHOLDED
from .llama import Llama

HIST_MIN_EXP = -40  # bin b holds |a| in [2^(b-40), 2^(b-39)); matches the native profiler


def _none() -> np.ndarray:
    return np.zeros(0, dtype=np.uint64)


@dataclasses.dataclass
class LayerProfile:
    tokens: int
    gate_positive: np.ndarray
    both_positive: np.ndarray
    abs_act_mean: np.ndarray
    hist: np.ndarray
    samples_x: np.ndarray       # (samples, n_embd) float16
    samples_active: np.ndarray  # (samples, n_ff) bool
    fhist: np.ndarray = dataclasses.field(default_factory=_none)  # |f(gate)| counts, bins of _core.fhist_edges
    above: np.ndarray = dataclasses.field(default_factory=_none)  # per neuron: |f(gate)| > threshold
    threshold: float = float("nan")  # |f(gate)| threshold of the active set (NaN: gate > 0)

    @property
    def n_ff(self) -> int:
        return int(self.gate_positive.shape[0])

    @property
    def thresholded(self) -> bool:
        return not np.isnan(self.threshold)

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of tokens on which each neuron was active: |f(gate)| > threshold on a
        thresholded layer, else gate > 0."""
        return (self.above if self.thresholded else self.gate_positive) / max(self.tokens, 1)

    @property
    def sparsity(self) -> float:
        """Fraction of (token, neuron) pairs inactive."""
        return 1.0 - float(self.frequency.mean())

    def inactive_fraction(self, activation: str) -> float:
        """Fraction of (token, neuron) pairs inactive under `activation` (powerinfer.format
        ACTIVATIONS); NaN when this profile cannot tell (fatrelu; a thresholded activation on a
        layer profiled without threshold)."""
        if activation in THRESHOLDED:
            active = self.above if self.thresholded else None
        else:
            active = {"relu": self.gate_positive, "relu2": self.gate_positive, "drelu": self.both_positive}.get(activation)
        if active is None or self.tokens == 0:
            return float("nan")
        return 1.0 - float(active.sum()) / (self.tokens * self.n_ff)

    def calibrate_threshold(self, sparsity: float) -> float:
        """The |f(gate)| threshold t with fraction(|f(gate)| <= t) = `sparsity` on the profiled
        tokens, interpolated linearly within a bin of the fhist histogram."""
        return quantile_of_histogram(self.fhist, sparsity)

    def magnitude_threshold(self, sparsity: float) -> float:
        """Smallest power-of-two |activation| threshold that zeroes at least `sparsity` of all
        activations (from the histogram)."""
        cumulative = np.cumsum(self.hist) / max(int(self.hist.sum()), 1)
        bin_index = int(np.searchsorted(cumulative, sparsity))
        return float(2.0 ** (bin_index + 1 + HIST_MIN_EXP))


def quantile_of_histogram(counts: np.ndarray, q: float) -> float:
    """The value below which fraction `q` of the histogrammed magnitudes lie (bins of
    _core.fhist_edges, values taken as uniform within a bin)."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {q}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no |f(gate)| histogram: the layer was not profiled with a gate function")
    edges = _core.fhist_edges()
    cumulative = np.concatenate([[0], np.cumsum(counts)]) / total  # at each bin's lower edge
    b = int(np.searchsorted(cumulative, q, side="right")) - 1      # bin where q is crossed
    b = min(b, len(counts) - 1)
    inside = (q - cumulative[b]) / max(cumulative[b + 1] - cumulative[b], 1e-300)
    return float(edges[b] + inside * (edges[b + 1] - edges[b]))


def fraction_at_or_below(counts: np.ndarray, t: float) -> float:
    """The fraction of the histogrammed magnitudes that are <= t (the inverse of
    quantile_of_histogram, with the same uniform-within-a-bin reading)."""
    edges = _core.fhist_edges()
    b = min(int(np.searchsorted(edges, t, side="right")) - 1, len(counts) - 1)
    if b < 0:
        return 0.0
    inside = min((t - edges[b]) / (edges[b + 1] - edges[b]), 1.0)
    return float((counts[:b].sum() + inside * counts[b]) / max(int(counts.sum()), 1))


@dataclasses.dataclass
class ModelProfile:
    model_path: str
    tokens: int
    layers: list[LayerProfile]
    fingerprint: str = ""  # of the model profiled (powerinfer.format.fingerprint)
    target_sparsity: float = float("nan")  # the layers' thresholds were calibrated for it (NaN: none)

    @property
    def thresholded(self) -> bool:
        return not np.isnan(self.target_sparsity)

    def thresholds(self) -> dict[int, float]:
        return {il: layer.threshold for il, layer in enumerate(self.layers) if layer.thresholded}

    def frequencies(self) -> dict[int, np.ndarray]:
        return {il: layer.frequency for il, layer in enumerate(self.layers) if layer.tokens > 0}

    def summary(self) -> str:
        lines = ["layer  tokens  active(gate>0)  active(dReLU)  neurons for 80% of activity"
                 + ("  |f(gate)| threshold  active(> threshold)" if self.thresholded else "")]
        for il, layer in enumerate(self.layers):
            freq = np.sort(layer.frequency)[::-1]
            share = np.cumsum(freq) / max(freq.sum(), 1e-12)
            hot = int(np.searchsorted(share, 0.8)) + 1
            gate = layer.gate_positive.sum() / max(layer.tokens * layer.n_ff, 1)
            both = layer.both_positive.sum() / max(layer.tokens * layer.n_ff, 1)
            line = f"{il:5d}  {layer.tokens:6d}  {gate:14.3f}  {both:13.3f}  {hot / layer.n_ff:8.1%} of {layer.n_ff}"
            if layer.thresholded:
                line += f"  {layer.threshold:19.4g}  {1 - layer.sparsity:19.3f}"
            lines.append(line)
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (temp name, then rename)."""
        arrays: dict[str, np.ndarray] = {
            "model_path": np.array(self.model_path),
            "tokens": np.array(self.tokens),
            "n_layers": np.array(len(self.layers)),
            "fingerprint": np.array(self.fingerprint),
            "target_sparsity": np.array(self.target_sparsity),
        }
        for il, layer in enumerate(self.layers):
            for field in dataclasses.fields(LayerProfile):
                arrays[f"{il}.{field.name}"] = np.asarray(getattr(layer, field.name))
        out = Path(path)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}.npz")
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ModelProfile":
        with np.load(path, allow_pickle=False) as z:
            layers = []
            for il in range(int(z["n_layers"])):
                values = {f.name: z[f"{il}.{f.name}"] for f in dataclasses.fields(LayerProfile)
                          if f"{il}.{f.name}" in z}  # profiles saved before fhist have none
                values["tokens"] = int(values["tokens"])
                if "threshold" in values:
                    values["threshold"] = float(values["threshold"])
                layers.append(LayerProfile(**values))
            fp = str(z["fingerprint"]) if "fingerprint" in z else ""
            target = float(z["target_sparsity"]) if "target_sparsity" in z else float("nan")
            return cls(str(z["model_path"]), int(z["tokens"]), layers, fp, target)


def _layer_from_native(d: dict) -> LayerProfile:
    n_ff = int(d["n_ff"])
    bits = d["samples_active_bits"]
    active = np.unpackbits(bits, axis=1, bitorder="little")[:, :n_ff].astype(bool)
    tokens = int(d["tokens"])
    return LayerProfile(
        tokens=tokens,
        gate_positive=d["gate_positive"].copy(),
        both_positive=d["both_positive"].copy(),
        abs_act_mean=d["abs_act_sum"] / max(tokens, 1),
        hist=d["hist"].copy(),
        samples_x=d["samples_x_f16"].view(np.float16).copy(),
        samples_active=active,
        fhist=d["fhist"].copy(),
        above=d["above"].copy(),
        threshold=float(d["threshold"]) if d["threshold"] >= 0 else float("nan"),
    )


def native_profiler(model_path: str | os.PathLike[str], *, max_samples: int = 0,
                    thresholds: Optional[dict[int, float]] = None, emulate: bool = False) -> "_core.Profiler":
    """The cb_eval observer for this model: its graph's gate function, per-layer thresholds."""
    from .format import model_gate_function

    thresholds = thresholds or {}
    per_layer = [float(thresholds.get(il, -1.0)) for il in range(max(thresholds, default=-1) + 1)]
    return _core.Profiler(max_samples, model_gate_function(model_path), per_layer, emulate)


def run_texts(llm: Llama, texts: Iterable[str], max_tokens: int, n_ctx: int,
              progress: Optional[Callable[[int], None]] = None) -> int:
    """Evaluate `texts` (each in windows of n_ctx tokens, from an empty cache) until
    max_tokens tokens have been seen; returns the tokens seen."""
    seen = 0
    for text in texts:
        tokens = llm.tokenize(text.encode("utf-8", "replace"))
        for start in range(0, len(tokens), n_ctx):
            window = tokens[start:start + n_ctx][: max_tokens - seen]
            if not window:
                break
            llm.reset()
            llm.eval(window)
            seen += len(window)
            if progress is not None:
                progress(len(window))
            if seen >= max_tokens:
                return seen
    return seen


def profile_model(model_path: str | os.PathLike[str], texts: Iterable[str], *, max_tokens: int = 16384,
                  n_ctx: int = 512, threads: Optional[int] = None, max_samples: int = 0,
                  ffn_on_disk: bool = True, thresholds: Optional[dict[int, float]] = None,
                  target_sparsity: float = float("nan"),
                  progress: Optional[Callable[[int], None]] = None) -> ModelProfile:
    """Run `texts` through the model (each text in windows of n_ctx tokens, from an empty
    cache) until max_tokens tokens have been seen, and return the per-layer profile.

    With `thresholds` (per layer, from `calibrate_thresholds` for `target_sparsity`) those
    layers' active sets are |f(gate)| > threshold: in the counts and in the samples.

    The FFN stays on disk by default: a window of n_ctx tokens reads each FFN matrix once, which
    is cheap next to computing it, and a model larger than RAM can be profiled."""
    profiler = native_profiler(model_path, max_samples=max_samples, thresholds=thresholds)
    llm = Llama(os.fspath(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=True,  # the last layer sees every token
                ffn_on_disk=ffn_on_disk,
                eval_callback=(profiler.callback_address, profiler.user_data))
    try:
        seen = run_texts(llm, texts, max_tokens, n_ctx, progress)
        layers = [_layer_from_native(profiler.layer(il)) for il in range(profiler.n_layers)]
    finally:
        llm.close()
    if seen == 0:
        raise ValueError("the calibration text produced no tokens")
    from .format import fingerprint

    target = target_sparsity if thresholds else float("nan")
    return ModelProfile(os.fspath(model_path), seen, layers, fingerprint(model_path), target)


def calibrate_thresholds(model_path: str | os.PathLike[str], texts: Iterable[str], sparsity: float, *,
                         layers: Optional[Iterable[int]] = None, max_tokens: int = 4096, **kwargs: Any) -> dict[int, float]:
    """Per-layer |f(gate)| thresholds (CATS) with fraction(|f(gate)| <= t) = `sparsity` on
    `texts`: the first of two passes (the second, `profile_model(thresholds=...)`, records the
    active sets they define). `layers`: the layers to threshold (default all)."""
    prof = profile_model(model_path, texts, max_tokens=max_tokens, **kwargs)
    wanted = set(range(len(prof.layers)) if layers is None else layers)
    return {il: layer.calibrate_threshold(sparsity) for il, layer in enumerate(prof.layers) if il in wanted}
