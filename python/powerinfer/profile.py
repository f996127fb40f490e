"""Activation profiling: how often each FFN neuron fires, per layer, on calibration text.

The model runs densely through ``powerinfer.Llama`` with a native ``cb_eval`` observer
(``_core.Profiler``) that reads each layer's FFN input, gate and activation as they are
computed; results are the same as without it. Recorded per layer:

* ``gate_positive``: tokens where the gate pre-activation was > 0 (active under ReLU);
* ``both_positive``: tokens where gate and up were both > 0 (active under dReLU);
* ``abs_act_mean``: mean |activation| (what multiplies ffn_down) per neuron;
* ``hist``: a log2 histogram of |activation| over all neurons (for magnitude thresholds);
* optional samples of (FFN input, gate > 0 set) for training predictors.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from . import _core
from .llama import Llama

HIST_MIN_EXP = -40  # bin b holds |a| in [2^(b-40), 2^(b-39)); matches the native profiler


@dataclasses.dataclass
class LayerProfile:
    tokens: int
    gate_positive: np.ndarray
    both_positive: np.ndarray
    abs_act_mean: np.ndarray
    hist: np.ndarray
    samples_x: np.ndarray       # (samples, n_embd) float16
    samples_active: np.ndarray  # (samples, n_ff) bool

    @property
    def n_ff(self) -> int:
        return int(self.gate_positive.shape[0])

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of tokens on which each neuron's gate was positive."""
        return self.gate_positive / max(self.tokens, 1)

    def magnitude_threshold(self, sparsity: float) -> float:
        """Smallest power-of-two |activation| threshold that zeroes at least `sparsity` of all
        activations (from the histogram)."""
        cumulative = np.cumsum(self.hist) / max(int(self.hist.sum()), 1)
        bin_index = int(np.searchsorted(cumulative, sparsity))
        return float(2.0 ** (bin_index + 1 + HIST_MIN_EXP))


@dataclasses.dataclass
class ModelProfile:
    model_path: str
    tokens: int
    layers: list[LayerProfile]
    fingerprint: str = ""  # of the model profiled (powerinfer.format.fingerprint)

    def frequencies(self) -> dict[int, np.ndarray]:
        return {il: layer.frequency for il, layer in enumerate(self.layers) if layer.tokens > 0}

    def summary(self) -> str:
        lines = ["layer  tokens  active(gate>0)  active(dReLU)  neurons for 80% of activity"]
        for il, layer in enumerate(self.layers):
            freq = np.sort(layer.frequency)[::-1]
            share = np.cumsum(freq) / max(freq.sum(), 1e-12)
            hot = int(np.searchsorted(share, 0.8)) + 1
            both = layer.both_positive.sum() / max(layer.tokens * layer.n_ff, 1)
            lines.append(f"{il:5d}  {layer.tokens:6d}  {freq.mean():14.3f}  {both:13.3f}  "
                         f"{hot / layer.n_ff:8.1%} of {layer.n_ff}")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (temp name, then rename)."""
        arrays: dict[str, np.ndarray] = {
            "model_path": np.array(self.model_path),
            "tokens": np.array(self.tokens),
            "n_layers": np.array(len(self.layers)),
            "fingerprint": np.array(self.fingerprint),
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
                values = {f.name: z[f"{il}.{f.name}"] for f in dataclasses.fields(LayerProfile)}
                values["tokens"] = int(values["tokens"])
                layers.append(LayerProfile(**values))
            fp = str(z["fingerprint"]) if "fingerprint" in z else ""
            return cls(str(z["model_path"]), int(z["tokens"]), layers, fp)


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
    )


def profile_model(model_path: str | os.PathLike[str], texts: Iterable[str], *, max_tokens: int = 16384,
                  n_ctx: int = 512, threads: Optional[int] = None, max_samples: int = 0,
                  ffn_on_disk: bool = True,
                  progress: Optional[Callable[[int], None]] = None) -> ModelProfile:
    """Run `texts` through the model (each text in windows of n_ctx tokens, from an empty
    cache) until max_tokens tokens have been seen, and return the per-layer profile.

    The FFN stays on disk by default: a window of n_ctx tokens reads each FFN matrix once, which
    is cheap next to computing it, and a model larger than RAM can be profiled."""
    profiler = _core.Profiler(max_samples)
    llm = Llama(os.fspath(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=True,  # the last layer sees every token
                ffn_on_disk=ffn_on_disk,
                eval_callback=(profiler.callback_address, profiler.user_data))
    seen = 0
    try:
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
                    break
            if seen >= max_tokens:
                break
        layers = [_layer_from_native(profiler.layer(il)) for il in range(profiler.n_layers)]
    finally:
        llm.close()
    if seen == 0:
        raise ValueError("the calibration text produced no tokens")
    from .format import fingerprint

    return ModelProfile(os.fspath(model_path), seen, layers, fingerprint(model_path))
