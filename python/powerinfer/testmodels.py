"""Synthetic llama-architecture GGUF models with planted activation sparsity.

The files load in stock llama.cpp. They are written tensor by tensor, so a 7B-class file needs
little memory: a few matrices at a time and the embedding (F16, kept for the output layer). How
sparsity is planted (see docs/test-models.md):

* Hidden dimension 0 is a *bias channel*: every token embedding holds the constant
  ``sqrt(n_embd)`` there and no layer writes to it (nor reads it, but for the gate).
* Each neuron ``i`` of each layer has a planted firing probability ``P_i``: a power law over a
  random ranking, ``P_i = min(0.99, c * r_i^-skew)``, with ``c`` set so that the mean is the
  requested active fraction. ``skew=0`` is uniform.
* Column 0 of gate row ``i`` (what multiplies the bias channel) is its threshold, calibrated so
  that the gate pre-activation is > 0 with probability ``P_i``: the generator pushes a batch of
  random token sequences through each layer in numpy as it writes it (``_Stream``), so the
  threshold accounts for the input that layer really sees, which changes with depth.
* Token-to-token locality: queries and keys are near zero, so attention averages the past; the
  attention output is scaled by ``locality``, mixing a slowly varying history into each token.
* Anisotropy: embedding dimension k (k >= 1) has variance ~ k^-spectrum_decay (mean 1), as hidden
  states of real models concentrate in few directions; this is what predictors exploit. Attention
  and FFN outputs are written with the same spectrum (their rows k are scaled alike), so the
  residual stream keeps it at every depth.
* Confident next tokens: each text token's successor (a random permutation) has an output row
  along the token's whitened embedding, so greedy margins are mostly large, as in trained models;
  special and byte tokens get small logits.
* Small updates: attention and FFN outputs are scaled by 1/sqrt(n_layer), so each layer changes
  the residual stream by a small fraction of its norm, as in trained models (at full size the
  7b preset amplified float noise into different greedy tokens).
* ReLU in a SiLU graph: gate rows are scaled by ``RELU_SHARPNESS`` (s) and up rows by 1/s, so
  stock llama.cpp's ``silu(s*g) * u/s`` equals ``relu(g) * u`` to within ``0.28 |u| / s``: the
  file is a ReLU model both to stock llama.cpp and to a backend that computes relu exactly.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

# see the module docstring: silu(s*g)/s approaches relu(g) as s grows
RELU_SHARPNESS = 64.0

try:
    import gguf
except ImportError as exc:  # pragma: no cover - gguf is a declared dependency
    raise ImportError("the gguf package is required: pip install gguf") from exc


@dataclasses.dataclass(frozen=True)
class ModelShape:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int = 4096


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(n_vocab=1024, n_embd=128, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_ctx=1024),
    "small": ModelShape(n_vocab=4096, n_embd=512, n_ff=2048, n_layer=4, n_head=8, n_head_kv=4),
    "1b": ModelShape(n_vocab=32000, n_embd=2048, n_ff=8192, n_layer=16, n_head=32, n_head_kv=8),
    "7b": ModelShape(n_vocab=32000, n_embd=4096, n_ff=14336, n_layer=32, n_head=32, n_head_kv=8),
}

TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}

# general.file_type values (llama_ftype) for the mostly-X types we write
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Sparsity:
    active_fraction: float = 0.1  # mean fraction of FFN neurons whose gate is > 0 per token
    skew: float = 1.0             # power-law exponent of neuron firing frequency (0 = uniform)
    locality: float = 0.5         # weight of the attention history in each token's input
    spectrum_decay: float = 1.5   # hidden-state variance of dimension k ~ k^-decay (0 = isotropic)


def firing_probabilities(n: int, active_fraction: float, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Per-neuron firing probability: a power law over a random ranking, with the given mean."""
    if not 0.0 < active_fraction < 1.0:
        raise ValueError(f"active fraction must be in (0, 1), got {active_fraction}")
    ranks = rng.permutation(n).astype(np.float64) + 1.0
    shape = ranks ** (-skew)
    cap = 0.99
    lo, hi = 0.0, 1.0
    while np.minimum(cap, shape * hi).mean() < active_fraction:
        if hi > 1e12:
            raise ValueError(f"active fraction {active_fraction} is not reachable with skew {skew}")
        hi *= 2.0
    for _ in range(100):  # bisection on the scale c
        mid = (lo + hi) / 2
        if np.minimum(cap, shape * mid).mean() < active_fraction:
            lo = mid
        else:
            hi = mid
    return np.clip(shape * hi, 1e-6, cap)


N_NON_TEXT_TOKENS = 3 + 256  # <unk>, <s>, </s> and the byte tokens lead the vocabulary
SUCCESSOR_LEAD = 6.0         # median logit lead of a token's successor, in logit stds


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-style vocabulary: specials, 256 byte tokens, then letter pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    assert len(tokens) == N_NON_TEXT_TOKENS
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    pieces: list[str] = []
    seen: set[str] = set()

    def add(piece: str) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)

    for ch in letters + letters.upper() + "0123456789.,!?;:'\"()-":
        add(ch)
        add("\u2581" + ch)
    for a in letters:
        for b in letters:
            add(a + b)
            add("\u2581" + a + b)
    for a in letters:
        for b in letters:
            for c in letters:
                add(a + b + c)
                add("\u2581" + a + b + c)
    need = n_vocab - len(tokens)
    if need > len(pieces):
        raise ValueError(f"n_vocab {n_vocab} is larger than the synthetic vocabulary ({len(tokens) + len(pieces)})")
    pieces = pieces[:need]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def _quantize(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return rows.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return rows.astype(np.float16)
    return gguf.quants.quantize(rows.astype(np.float32), qtype)


def _dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)


def _tensor_nbytes(shape: tuple[int, int], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block != 0:
        raise ValueError(f"row length {cols} is not a multiple of the {qtype.name} block size {block}")
    return rows * cols // block * type_size


@dataclasses.dataclass
class _TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) shape
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 values
    # sees the values as stored (after quantization); called before the next tensor is made
    observe: Callable[[np.ndarray], None] | None = None


# The simulated batch: random tokens in causal sequences, long enough for attention's history
# average to settle and for per-neuron statistics (256 samples) to be accurate to a few percent.
SIM_SEQUENCES = 4
SIM_LENGTH = 64
_RMS_EPS = 1e-5


def _rms_norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + _RMS_EPS)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for the large sharpened gate values


class _Stream:
    """The residual stream of a batch of token sequences, advanced in numpy through each layer as
    the layer is written (llama graph with uniform causal attention: queries and keys are ~0).

    A layer's FFN input is not what the first layer sees: attention and FFN outputs add to every
    hidden dimension but the bias channel, so after RMSNorm the bias channel shrinks with depth
    and each gate row sees the rest of its input with its own mean and spread. Calibrating each
    layer's gate against the simulated input keeps the planted firing probabilities in every
    layer; without it the 1b preset drifted from 11% active in layer 0 to 31% in layer 15."""

    def __init__(self, n_seq: int, n_head: int, n_head_kv: int) -> None:
        self.n_seq = n_seq
        self.n_head, self.n_head_kv = n_head, n_head_kv
        self.x = self._values = self._xn = self._gate = self._up = np.zeros(0, np.float32)

    def start(self, embeddings: np.ndarray) -> None:
        """The sequences' token embeddings, (n_seq * length, n_embd) in sequence order."""
        self.x = embeddings.astype(np.float32)

    def set_values(self, wv: np.ndarray) -> None:
        self._values = _rms_norm(self.x) @ wv.T  # attn_norm.weight is 1

    def add_attention(self, wo: np.ndarray) -> None:
        tokens, n = self.x.shape
        length = tokens // self.n_seq
        v = self._values.reshape(self.n_seq, length, -1)
        history = np.cumsum(v, axis=1) / np.arange(1, length + 1, dtype=np.float32)[None, :, None]
        head_dim = v.shape[2] // self.n_head_kv
        grouped = history.reshape(self.n_seq, length, self.n_head_kv, 1, head_dim)
        heads = np.broadcast_to(grouped, (self.n_seq, length, self.n_head_kv,
                                          self.n_head // self.n_head_kv, head_dim))
        self.x += heads.reshape(tokens, n) @ wo.T
        self._xn = _rms_norm(self.x)  # ffn_norm.weight is 1

    def ffn_input(self) -> np.ndarray:
        return self._xn

    def set_gate(self, wg: np.ndarray) -> None:
        self._gate = self._xn @ wg.T

    def set_up(self, wu: np.ndarray) -> None:
        self._up = self._xn @ wu.T

    def add_ffn(self, wd: np.ndarray) -> None:
        g = self._gate
        self.x += (g * _sigmoid(g) * self._up) @ wd.T  # what stock llama.cpp computes


def layer_firing_probabilities(n_ff: int, sparsity: Sparsity, seed: int, layer: int) -> np.ndarray:
    """The per-neuron firing probabilities planted in `layer` of a model written with `seed`."""
    rng = np.random.default_rng([seed, layer])
    return firing_probabilities(n_ff, sparsity.active_fraction, sparsity.skew, rng)


def calibrate_bias_column(z: np.ndarray, bias_channel: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Column 0 of the gate, per neuron: the c_i with P(c_i * a + z_i > 0) = probs_i, where `z`
    (tokens, n_ff) is the rest of each gate pre-activation and `bias_channel` (tokens,) the FFN
    input's dimension 0 (a > 0). c_i * a + z_i > 0 iff c_i > -z_i / a; -z_i / a is fitted by a
    normal distribution over the sampled tokens (an empirical quantile is too noisy in the tails)."""
    u = -z / bias_channel[:, None]
    inv = statistics.NormalDist().inv_cdf
    quantiles = np.array([inv(float(q)) for q in probs], dtype=np.float64)
    return (u.mean(axis=0, dtype=np.float64) + u.std(axis=0, dtype=np.float64) * quantiles).astype(np.float32)


def _plan(shape: ModelShape, wtype: gguf.GGMLQuantizationType, sparsity: Sparsity, seed: int,
          rng: np.random.Generator) -> Iterator[_TensorPlan]:
    """The tensors in file order. make() and observe() must run in that order: each layer's gate
    is calibrated against the simulated stream that the layers before it produce."""
    n, f = shape.n_embd, shape.n_ff
    head_dim = n // shape.n_head
    n_kv = head_dim * shape.n_head_kv
    f32 = gguf.GGMLQuantizationType.F32
    sample_tokens = rng.integers(0, shape.n_vocab, SIM_SEQUENCES * SIM_LENGTH)
    stream = _Stream(SIM_SEQUENCES, shape.n_head, shape.n_head_kv)

    def normal(rows: int, cols: int, std: float) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)

    # hidden states of real models are anisotropic: a few directions carry most of the variance,
    # which is what makes FFN activity predictable from a low-rank view of the input
    spectrum = np.arange(1, n, dtype=np.float64) ** (-sparsity.spectrum_decay / 2)
    spectrum = (spectrum / np.sqrt(np.mean(spectrum ** 2))).astype(np.float32)

    # Each layer is a small update of the residual stream, as in trained models: attention and FFN
    # outputs are scaled by 1/sqrt(n_layer), so what all layers write together is about the size
    # of the token embedding. At full size each of the 7B's 64 sublayers changed the stream by
    # about half its norm; the model was chaotic (float noise alone moved logits by up to 21).
    update = np.float32(1.0 / math.sqrt(shape.n_layer))

    kept: list[np.ndarray] = []  # the embedding, F16, for the output layer's successor rows

    def embedding() -> np.ndarray:
        e = normal(shape.n_vocab, n, 1.0)
        e[:, 1:] *= spectrum
        e[:, 0] = math.sqrt(n)
        kept.append(e.astype(np.float16))
        # the sampled rows as stored (rows quantize independently): no dequantized copy of all
        stream.start(_dequantize(_quantize(e[sample_tokens], wtype), wtype))
        return e

    def ones() -> np.ndarray:
        return np.ones((n,), dtype=np.float32)

    yield _TensorPlan("token_embd.weight", (shape.n_vocab, n), wtype, embedding)
    for il in range(shape.n_layer):
        p = f"blk.{il}."

        def gate(il: int = il) -> np.ndarray:
            w = normal(f, n, 1.0 / math.sqrt(n))
            w[:, 0] = 0.0
            xn = stream.ffn_input()  # this layer's FFN input, simulated
            probs = layer_firing_probabilities(f, sparsity, seed, il)
            w[:, 0] = calibrate_bias_column(xn @ w.T, xn[:, 0], probs)
            return w * np.float32(RELU_SHARPNESS)

        # Layers write into the residual stream with the embedding's spectrum, so every layer's
        # input stays anisotropic: with isotropic outputs the stream's spectrum flattened with
        # depth (the optimal rank-256 linear predictor of the 7B's layer 31 computed 43% of
        # neurons at recall 0.995, against 16% in layer 0), unlike real models.
        def wo() -> np.ndarray:
            w = normal(n, n, update * sparsity.locality / math.sqrt(n))
            w[0, :] = 0.0  # nothing writes the bias channel
            w[1:, :] *= spectrum[:, None]
            return w

        def down() -> np.ndarray:
            w = normal(n, f, update * 0.5 / math.sqrt(f * max(sparsity.active_fraction, 0.05)))
            w[0, :] = 0.0
            w[1:, :] *= spectrum[:, None]
            return w

        # Values and up projections ignore the bias channel (column 0 is zero): it would add the
        # same vector to every token in every layer, a shared offset that crowds out the
        # token-dependent part of deeper layers' inputs. It feeds only the gate thresholds.
        def wv() -> np.ndarray:
            w = normal(n_kv, n, 1.0 / math.sqrt(n))
            w[:, 0] = 0.0
            return w

        def up() -> np.ndarray:
            w = normal(f, n, 1.0 / (RELU_SHARPNESS * math.sqrt(n)))
            w[:, 0] = 0.0
            return w

        yield _TensorPlan(p + "attn_norm.weight", (n,), f32, ones)
        yield _TensorPlan(p + "attn_q.weight", (n, n), wtype, lambda: normal(n, n, 0.1 / math.sqrt(n)))
        yield _TensorPlan(p + "attn_k.weight", (n_kv, n), wtype, lambda: normal(n_kv, n, 0.1 / math.sqrt(n)))
        yield _TensorPlan(p + "attn_v.weight", (n_kv, n), wtype, wv, stream.set_values)
        yield _TensorPlan(p + "attn_output.weight", (n, n), wtype, wo, stream.add_attention)
        yield _TensorPlan(p + "ffn_norm.weight", (n,), f32, ones)
        yield _TensorPlan(p + "ffn_gate.weight", (f, n), wtype, gate, stream.set_gate)
        yield _TensorPlan(p + "ffn_up.weight", (f, n), wtype, up, stream.set_up)
        yield _TensorPlan(p + "ffn_down.weight", (n, f), wtype, down, stream.add_ffn)

    def output() -> np.ndarray:
        w = normal(shape.n_vocab, n, 8.0 / math.sqrt(n))
        # specials and byte tokens get small logits, as in trained models: greedy text is then
        # valid UTF-8 (llama-cpp-python's completion does not count tokens that end in an
        # incomplete UTF-8 sequence, and a model repeating a lone lead byte fills the context)
        w[:N_NON_TEXT_TOKENS] *= np.float32(0.25)
        # Confident predictions, as trained models make at most positions: each text token has
        # a successor whose output row also points along the token's embedding, scaled so that
        # on the simulated final hidden states its logit leads by SUCCESSOR_LEAD logit stds
        # (median). With Gaussian logits alone 1-5% of positions were near ties that float
        # noise flips (docs/test-models.md).
        text = np.arange(N_NON_TEXT_TOKENS, shape.n_vocab)
        if len(text) > 1:
            e = kept.pop()
            successor = np.empty(shape.n_vocab, dtype=np.int64)
            successor[text] = rng.permutation(text)
            # whitened: along its own embedding, not the directions every embedding shares
            direction = e[:, 1:].astype(np.float32) / spectrum
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            h = _rms_norm(stream.x)  # output_norm.weight is 1
            t = sample_tokens[sample_tokens >= N_NON_TEXT_TOKENS]
            along = np.einsum("ij,ij->i", h[sample_tokens >= N_NON_TEXT_TOKENS, 1:], direction[t])
            scale = SUCCESSOR_LEAD * 8.0 / max(float(np.median(along)), 1e-6)
            w[successor[text], 1:] += np.float32(scale) * direction[text]
        return w

    yield _TensorPlan("output_norm.weight", (n,), f32, ones)
    yield _TensorPlan("output.weight", (shape.n_vocab, n), wtype, output)


def write_test_model(path: str | os.PathLike[str], *, preset: str = "tiny", wtype: str = "f16",
                     sparsity: Sparsity = Sparsity(), seed: int = 0,
                     shape: ModelShape | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a synthetic model to `path` (atomically: a temp name, then rename)."""
    if wtype not in TYPES:
        raise ValueError(f"unsupported type {wtype!r}; choose one of {', '.join(TYPES)}")
    if shape is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        shape = PRESETS[preset]
    qtype = TYPES[wtype]
    if shape.n_embd % shape.n_head != 0:
        raise ValueError("n_embd must be a multiple of n_head")
    rng = np.random.default_rng(seed)
    out = Path(path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")

    tokens, scores, types = _vocab(shape.n_vocab)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"powerinfer-synthetic-{preset if shape is PRESETS.get(preset) else 'custom'}-{wtype}")
    w.add_file_type(_FILE_TYPES[wtype])
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_string("powerinfer.synthetic.activation", "relu")
    w.add_float32("powerinfer.synthetic.relu_sharpness", RELU_SHARPNESS)
    w.add_float32("powerinfer.synthetic.active_fraction", sparsity.active_fraction)
    w.add_float32("powerinfer.synthetic.skew", sparsity.skew)
    w.add_float32("powerinfer.synthetic.locality", sparsity.locality)
    w.add_float32("powerinfer.synthetic.spectrum_decay", sparsity.spectrum_decay)
    w.add_uint32("powerinfer.synthetic.seed", seed)

    plans = list(_plan(shape, qtype, sparsity, seed, rng))
    for t in plans:
        if len(t.shape) == 1:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.shape[0] * 4)
        else:
            nbytes = _tensor_nbytes(t.shape, t.qtype)  # type: ignore[arg-type]
            if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.dtype(np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(t.name, t.shape, dtype, nbytes)
            else:
                block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
                byte_shape = (t.shape[0], t.shape[1] // block * type_size)
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(plans):
            values = t.make()
            data = _quantize(values, t.qtype) if values.ndim == 2 else values
            del values  # one matrix of memory at a time
            if t.observe is not None:
                t.observe(_dequantize(data, t.qtype))
            w.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(plans))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_pwri_test_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, rank: int = 32,
                          keep_down: bool = False) -> Path:
    """A model in PowerInfer's own format (magic PWRI) made from a synthetic GGUF `src`: per layer
    ``ffn_down_t`` (``ffn_down`` dropped unless `keep_down`), and a predictor ``fc1``/``fc2`` (F16)
    whose score is a rank-`rank`/2 approximation of the gate pre-activation (fc1 = [V, -V], so
    ``fc2 . relu(fc1 . x) = U S V^T x``), with ``powerinfer.sparse_threshold`` 0."""
    from . import _core

    from .gguf_io import write_gguf

    src_p = os.fspath(src)
    header = _core.read_gguf_header(src_p, ["general.architecture"])
    tensors = {t["name"]: t for t in header["tensors"]}
    data = np.memmap(src_p, mode="r")

    def matrix(name: str) -> np.ndarray:
        t = tensors[name]
        return _core.dequantize_rows(t["type"], np.asarray(data[t["offset"]:t["offset"] + t["nbytes"]]), t["ne"][0])

    layers = sorted(int(n.split(".")[1]) for n in tensors if n.endswith(".ffn_gate.weight"))
    f16 = int(gguf.GGMLQuantizationType.F16)
    add, payload = [], {}
    for il in layers:
        down = tensors[f"blk.{il}.ffn_down.weight"]
        n_ff, n_embd = down["ne"]
        add.append((f"blk.{il}.ffn_down_t.weight", down["type"], [n_embd, n_ff]))
        payload[f"blk.{il}.ffn_down_t.weight"] = _core.quantize_rows(
            down["type"], np.ascontiguousarray(matrix(down["name"]).T))
        u, s, vt = np.linalg.svd(matrix(f"blk.{il}.ffn_gate.weight"), full_matrices=False)
        k = rank // 2
        v, us = vt[:k], u[:, :k] * s[:k]
        add.append((f"blk.{il}.fc1.weight", f16, [n_embd, 2 * k]))
        payload[f"blk.{il}.fc1.weight"] = np.concatenate([v, -v]).astype(np.float16)
        add.append((f"blk.{il}.fc2.weight", f16, [2 * k, n_ff]))
        payload[f"blk.{il}.fc2.weight"] = np.concatenate([us, -us], axis=1).astype(np.float16)
    skip = [] if keep_down else [f"blk.{il}.ffn_down.weight" for il in layers]
    w = _core.GgufHeaderWriter(src_p, int(header["alignment"]))
    w.set_f32("powerinfer.sparse_threshold", 0.0)
    infos = w.add_source_tensors(skip, add)
    meta = bytearray(w.meta())
    meta[:4] = b"PWRI"

    def tensor_bytes(t: dict) -> bytes:
        if t["offset"] is not None:
            return np.asarray(data[t["offset"]:t["offset"] + t["nbytes"]]).tobytes()
        return np.ascontiguousarray(payload[t["name"]]).tobytes()

    return write_gguf(Path(dst), bytes(meta), infos, tensor_bytes)
