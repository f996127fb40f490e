"""Per-layer activation predictors: ``score = fc2 · relu(fc1 · x) + b``, made in numpy.

A neuron is computed when its score reaches the layer's threshold, which is set on held-out
samples so that the target recall is met there; precision and the predicted-active fraction are
reported. Two ways to make one:

* ``fit_linear_predictor``, for layers whose active set is gate pre-activation > 0 (the ReLU
  family): the best rank-r linear estimate of the pre-activation over the sampled inputs, each
  neuron's score being its estimate in units of its own residual error, so that one threshold
  asks every neuron for the same confidence and the neurons it misses are those barely above
  zero, whose activations are smallest. Stored as a ReLU network of rank 2r (see ``linear``).
* ``train_predictor``: a ReLU network trained on a weighted binary cross-entropy that favours
  recall, for layers whose active set is not a half-space of the gate (thresholded SiLU/GELU).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

# Recall the threshold is set for on validation samples. Misses add up over layers: 0.995 per
# layer (0.993 held out) kept only 87-92% of greedy tokens on the synthetic 7B (32 layers), and
# the sparse engine's default mode uses no predictor whose held-out recall is below 0.995.
TARGET_RECALL = 0.999

import numpy as np


@dataclasses.dataclass
class Predictor:
    fc1: np.ndarray    # (n_embd, rank)
    fc2: np.ndarray    # (rank, n_ff)
    bias: np.ndarray   # (n_ff,)
    threshold: float

    def scores(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x.astype(np.float32) @ self.fc1, 0.0)
        return h @ self.fc2 + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x) >= self.threshold

    @property
    def rank(self) -> int:
        return int(self.fc1.shape[1])

    def nbytes_f16(self) -> int:
        return stored_bytes(self.fc1.shape[0], self.fc2.shape[1], self.rank)


@dataclasses.dataclass
class PredictorQuality:
    recall: float             # of truly active neurons, the fraction predicted
    precision: float          # of predicted neurons, the fraction truly active
    predicted_fraction: float  # neurons computed per token / n_ff
    true_fraction: float      # truly active per token / n_ff


def evaluate(p: Predictor, x: np.ndarray, active: np.ndarray) -> PredictorQuality:
    pred = p.predict(x)
    tp = float(np.logical_and(pred, active).sum())
    return PredictorQuality(
        recall=tp / max(float(active.sum()), 1.0),
        precision=tp / max(float(pred.sum()), 1.0),
        predicted_fraction=float(pred.mean()),
        true_fraction=float(active.mean()),
    )


# Largest stored predictor, as a fraction of its layer's FFN bytes: it is held in RAM.
PREDICTOR_BUDGET = 0.10


def choose_rank(n_embd: int, n_ff: int, ffn_bytes: int, budget: float = PREDICTOR_BUDGET, max_rank: int = 1024) -> int:
    """Largest power of two whose F16 predictor stays within `budget` of the layer's FFN bytes."""
    r = 16
    while r * 2 <= max_rank and stored_bytes(n_embd, n_ff, 2 * r) <= budget * ffn_bytes:
        r *= 2
    return r


def set_threshold(p: Predictor, x: np.ndarray, active: np.ndarray, target_recall: float) -> None:
    """The highest threshold that keeps `target_recall` of the active neurons of these samples."""
    s = p.scores(x)[active]
    p.threshold = float(np.quantile(s, 1.0 - target_recall)) if s.size else float("inf")


def train_predictor(x: np.ndarray, active: np.ndarray, *, rank: int, x_val: Optional[np.ndarray] = None,
                    active_val: Optional[np.ndarray] = None, target_recall: float = TARGET_RECALL, epochs: int = 30,
                    batch: int = 128, lr: float = 2e-3, pos_weight: Optional[float] = None,
                    gate: Optional[np.ndarray] = None, seed: int = 0) -> tuple[Predictor, PredictorQuality]:
    """Train on (x, active) samples; set the threshold and report quality on the validation
    samples (the training samples if none are given).

    With the layer's gate weights (n_ff x n_embd, dequantized), training starts from their best
    rank-r/2 approximation, written as relu(a) - relu(-a) so the ReLU network is linear at first:
    the gate pre-activation is what decides ReLU activity."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float32)
    y = active.astype(np.float32)
    n, n_embd = x.shape
    n_ff = y.shape[1]
    # normalise the input scale so one learning rate fits every layer
    scale = np.float32(1.0 / max(float(np.sqrt(np.mean(x * x))), 1e-6))
    freq = np.clip(y.mean(axis=0), 1e-4, 1 - 1e-4)
    if pos_weight is None:
        pos_weight = float(np.clip((1 - freq.mean()) / freq.mean(), 1.0, 50.0))

    w1 = rng.standard_normal((n_embd, rank)).astype(np.float32) * np.float32(np.sqrt(2.0 / n_embd))
    w2 = rng.standard_normal((rank, n_ff)).astype(np.float32) * np.float32(np.sqrt(1.0 / rank) * 0.1)
    b = np.log(freq / (1 - freq)).astype(np.float32)
    if gate is not None:
        half = rank // 2
        u, sv, vt = np.linalg.svd(gate.astype(np.float32) / scale, full_matrices=False)  # input is x*scale
        root = np.sqrt(sv[:half]).astype(np.float32)
        a = (vt[:half].T * root).astype(np.float32)            # (n_embd, half)
        c = (u[:, :half] * root).T.astype(np.float32)          # (half, n_ff)
        w1 = np.concatenate([a, -a], axis=1)
        w2 = np.concatenate([c, -c], axis=0) * np.float32(4.0)  # steep logistic around g = 0
        b = np.zeros(n_ff, dtype=np.float32)
    params = [w1, w2, b]
    m = [np.zeros_like(v) for v in params]
    v2 = [np.zeros_like(v) for v in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    t = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = x[idx] * scale, y[idx]
            pre = xb @ w1
            h = np.maximum(pre, 0.0)
            z = h @ w2 + b
            p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow
            # d/dz of weighted BCE: w·y·(p-1) + (1-y)·p
            g = (pos_weight * yb * (p - 1.0) + (1.0 - yb) * p) / np.float32(len(idx))
            grads = [xb.T @ ((g @ w2.T) * (pre > 0)), h.T @ g, g.sum(axis=0)]
            t += 1
            for i, (param, grad) in enumerate(zip(params, grads)):
                m[i] = beta1 * m[i] + (1 - beta1) * grad
                v2[i] = beta2 * v2[i] + (1 - beta2) * grad * grad
                mhat = m[i] / (1 - beta1 ** t)
                vhat = v2[i] / (1 - beta2 ** t)
                param -= (lr * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)
    pred = Predictor(fc1=w1 * scale, fc2=w2, bias=b, threshold=0.0)
    xv = x if x_val is None else x_val.astype(np.float32)
    av = active if active_val is None else active_val
    set_threshold(pred, xv, av.astype(bool), target_recall)
    return pred, evaluate(pred, xv, av.astype(bool))


def linear(fc1: np.ndarray, fc2: np.ndarray, bias: np.ndarray) -> Predictor:
    """The linear map ``fc2 · (fc1 · x) + bias`` as a ReLU network of twice the rank:
    relu(a) - relu(-a) = a. The backend recognises the negated pairs and holds the linear map
    itself (half the rank; each weight read once per token)."""
    return Predictor(fc1=np.concatenate([fc1, -fc1], axis=1).astype(np.float32),
                     fc2=np.concatenate([fc2, -fc2], axis=0).astype(np.float32),
                     bias=bias.astype(np.float32), threshold=0.0)


def stored_bytes(n_embd: int, n_ff: int, rank: int) -> int:
    """Bytes of a rank-`rank` predictor as the file stores it: F16 fc1, fc2 and bias."""
    return 2 * rank * (n_embd + n_ff) + 2 * n_ff


def _balanced(fc1: np.ndarray, fc2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same product fc1 · fc2 with each hidden unit's fc1 column and fc2 row of equal
    largest magnitude, so that neither falls out of F16's range."""
    a = np.abs(fc1).max(axis=0)
    c = np.abs(fc2).max(axis=1)
    k = np.sqrt(np.where((a > 0) & (c > 0), c / np.maximum(a, 1e-30), 1.0)).astype(np.float32)
    return fc1 * k, fc2 / k[:, None]


def fit_linear_predictor(x: np.ndarray, gate: np.ndarray, *, x_val: np.ndarray, active_val: np.ndarray,
                         gate_bytes: float, max_bytes: float, target_recall: float = TARGET_RECALL,
                         ranks: tuple[int, ...] = (16, 32, 64, 128, 256, 512)) -> tuple[Predictor, PredictorQuality]:
    """A predictor for a layer whose neurons are active when their gate pre-activation
    z = gate · x is > 0: for each rank r of `ranks` whose stored predictor fits in `max_bytes`
    (the smallest if none does), the rank-r linear map M minimising the squared error of M·x
    against z over the samples (reduced-rank regression), with score_i = (M·x + mean
    residual)_i / (residual RMS)_i; the rank kept is the one with which sparse decode reads
    least: predictor plus `gate_bytes` times the fraction of neurons predicted on the
    validation samples at `target_recall`.

    `gate` is the layer's gate matrix (n_ff x n_embd, dequantized), `x` the training inputs."""
    from . import _core

    x = x.astype(np.float32)
    z = x @ gate.T                                       # (samples, n_ff)
    n_embd, n_ff = x.shape[1], z.shape[1]
    # a residual below 1% of a neuron's scale is no more than F16 rounding will add
    rms_floor = 1e-2 * np.sqrt(np.mean(z * z, axis=0)) + 1e-30
    # x = U S Vt; the regression's fitted values live in span(U): z ~ U B with B = Ut z
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    b = u.T @ z
    _, p = np.linalg.eigh(b @ b.T)
    p = p[:, ::-1]                                       # leading directions of the fit first
    # x -> the U coordinates; ridge on tiny singular values, whose directions the samples barely hold
    to_u = vt.T * (s / (s * s + np.float32(1e-3 * float(np.mean(s * s)))))
    xv = x_val.astype(np.float32)
    av = active_val.astype(bool)
    best: Optional[tuple[float, Predictor, PredictorQuality]] = None
    fitting = [r for r in ranks if stored_bytes(n_embd, n_ff, 2 * r) <= max_bytes]
    # the smallest rank if none fits, as choose_rank; none above the samples' rank
    for r in sorted({min(r, len(s)) for r in fitting or [min(ranks)]}):
        pr = p[:, :r]
        fc1 = to_u @ pr                                  # (n_embd, r)
        fc2 = pr.T @ b                                   # (r, n_ff)
        resid = z - (x @ fc1) @ fc2
        mean = resid.mean(axis=0)
        rms = np.maximum(np.sqrt(np.mean((resid - mean) ** 2, axis=0)), rms_floor)
        pred = as_stored(linear(*_balanced(fc1, fc2 / rms), mean / rms))
        set_threshold(pred, xv, av, target_recall)
        q = evaluate(pred, xv, av)
        cost = _core.predictor_decode_bytes(n_embd, n_ff, pred.rank, True) + q.predicted_fraction * gate_bytes
        if best is None or cost < best[0]:
            best = (cost, pred, q)
    assert best is not None
    return best[1], best[2]


def as_stored(p: Predictor) -> Predictor:
    """The predictor with its weights rounded to F16, as the model file stores them."""
    return Predictor(p.fc1.astype(np.float16).astype(np.float32), p.fc2.astype(np.float16).astype(np.float32),
                     p.bias.astype(np.float32), p.threshold)


def train_layer_predictors(train_layers: list, validation_layers: list, held_out_layers: list,
                           ffn_bytes: dict[int, int], *, target_recall: float = TARGET_RECALL,
                           gates: Optional[Callable[[int], Optional[tuple[np.ndarray, int]]]] = None,
                           progress: Optional[Callable[[int], None]] = None) -> dict[int, tuple[Predictor, PredictorQuality]]:
    """One predictor per profiled layer (LayerProfile lists with samples): made from the train
    samples, thresholded on validation samples from other documents, judged on held-out
    documents. Weights are rounded to F16 before the threshold is set, so the reported quality
    is that of the stored predictor.

    With `gates` (layer -> its gate matrix, n_ff x n_embd as float32, and the gate's stored
    bytes; None if it has none), a layer whose active set is gate > 0 gets
    ``fit_linear_predictor``, else one is trained (``train_predictor``)."""
    out: dict[int, tuple[Predictor, PredictorQuality]] = {}
    for il, (train, val, held) in enumerate(zip(train_layers, validation_layers, held_out_layers)):
        if len(train.samples_x) < 64 or len(val.samples_x) == 0 or len(held.samples_x) == 0:
            continue
        gate = gates(il) if gates is not None and not train.thresholded else None
        if gate is not None:
            p, _ = fit_linear_predictor(train.samples_x, gate[0], x_val=val.samples_x, active_val=val.samples_active,
                                        gate_bytes=gate[1], max_bytes=PREDICTOR_BUDGET * ffn_bytes[il],
                                        target_recall=target_recall)
        else:
            rank = choose_rank(train.samples_x.shape[1], train.n_ff, ffn_bytes[il])
            p, _ = train_predictor(train.samples_x, train.samples_active, rank=rank, x_val=val.samples_x,
                                   active_val=val.samples_active, target_recall=target_recall)
            p = as_stored(p)
            set_threshold(p, val.samples_x.astype(np.float32), val.samples_active, target_recall)
        out[il] = (p, evaluate(p, held.samples_x, held.samples_active))
        if progress is not None:
            progress(il)
    return out
