"""The PowerInfer model file: neuron-cluster bundles appended to a GGUF (see docs/format.md).

``convert()`` writes it from a source GGUF and a profile; ``PowerInferFile`` reads its layout.
Layout arithmetic lives here until the backend reads bundles itself (then it moves to C++).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import gguf
import numpy as np

from . import _core

if TYPE_CHECKING:
    from .predictor import Predictor, PredictorQuality

FORMAT_VERSION = 1
ARCH = "powerinfer"
ALIGN = 4096
MAX_CLUSTER = 128
FFN_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
SUPPORTED_ARCHS = ("llama", "mistral", "gemma3", "qwen2", "qwen3")
# What a bundled layer computes between gate/up and down (docs/format.md). The ReLU family is
# computed by the backend in place of the graph's GLU; the thresholded ones are the graph's own
# silu/gelu in dense mode, with the threshold used by sparse decode.
ACTIVATIONS = ("relu", "relu2", "drelu", "fatrelu", "silu_threshold", "gelu_threshold")
# thresholded activation -> the gate function f it thresholds: active iff |f(gate)| > threshold
THRESHOLDED = {"silu_threshold": "silu", "gelu_threshold": "gelu"}
_GRAPH_GATE_FUNCTION = {"gemma3": "gelu"}  # geglu; the other supported graphs are swiglu

K = "powerinfer."


class FormatError(ValueError):
    """The file is not a valid PowerInfer model, or cannot be converted."""


def _pad(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def cluster_size(gate_row_bytes: int, down_row_bytes: int) -> int:
    """Smallest power of two k with both halves of a k-neuron cluster a multiple of 4 KiB, or
    MAX_CLUSTER (halves are then padded)."""
    k = 1
    while k < MAX_CLUSTER and ((k * gate_row_bytes) % ALIGN or (k * (gate_row_bytes + down_row_bytes)) % ALIGN):
        k *= 2
    return k


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    layer: int
    n_ff: int
    n_embd: int
    gate_type: int        # type of gate and up rows
    down_type: int        # type of down_t rows (n_embd elements each)
    cluster: int          # neurons per cluster
    offset: int           # of the first cluster, relative to the region start

    @property
    def gate_row_bytes(self) -> int:
        return int(_core.row_size(self.gate_type, self.n_embd))

    @property
    def down_row_bytes(self) -> int:
        return int(_core.row_size(self.down_type, self.n_embd))

    @property
    def gate_half_bytes(self) -> int:
        return _pad(self.cluster * self.gate_row_bytes)

    @property
    def updown_half_bytes(self) -> int:
        return _pad(self.cluster * (self.gate_row_bytes + self.down_row_bytes))

    @property
    def n_clusters(self) -> int:
        return (self.n_ff + self.cluster - 1) // self.cluster

    @property
    def bytes(self) -> int:
        return self.n_clusters * (self.gate_half_bytes + self.updown_half_bytes)

    def gate_half(self, c: int) -> int:
        return self.offset + c * (self.gate_half_bytes + self.updown_half_bytes)

    def updown_half(self, c: int) -> int:
        return self.gate_half(c) + self.gate_half_bytes


def _header(path: str, prefixes: list[str]) -> dict:
    try:
        return _core.read_gguf_header(path, prefixes)
    except ValueError as exc:
        raise FormatError(str(exc)) from None


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a GGUF's header, metadata and tensor infos (cheap; names the model)."""
    from . import pwri

    if pwri.is_pwri(path):
        data_offset = int(pwri.header(path)["data_offset"])
    else:
        data_offset = int(_header(os.fspath(path), ["general.architecture"])["data_offset"])
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(data_offset)).hexdigest()


@dataclasses.dataclass
class PowerInferFile:
    path: str
    source_architecture: str
    source_sha256: str
    source_fingerprint: str
    region_offset: int
    layers: list[LayerLayout]
    activations: list[str]
    activation_thresholds: list[float]
    activation_sparsity: list[float]  # inactive fraction measured on held-out text (NaN: not measured)
    frequency_offsets: list[int]
    permutation_offsets: list[int]
    down_requant_error: list[float]
    data: np.ndarray  # the file, memory-mapped
    predictors: dict[int, dict] = dataclasses.field(default_factory=dict)  # layer index -> layout, quality

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "PowerInferFile":
        p = os.fspath(path)
        header = _header(p, ["general.architecture", K])
        kv = header["kv"]
        arch = kv.get("general.architecture")
        if arch != ARCH:
            raise FormatError(f"{p}: not a PowerInfer model (architecture {arch!r}); "
                              f"convert it with: powerinfer convert {p} OUT")

        def get(key: str):  # type: ignore[no-untyped-def]
            if K + key not in kv:
                raise FormatError(f"{p}: missing key {K + key}")
            return kv[K + key]

        if get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{p}: PowerInfer format version {get('format_version')}, this build reads {FORMAT_VERSION}")
        data_end = max((t["offset"] + _pad(t["nbytes"], header["alignment"]) for t in header["tensors"]),
                       default=header["data_offset"])
        region = _pad(data_end)
        names = ("layer", "n_ff", "n_embd", "gate_type", "down_type", "cluster", "offset")
        arrays = {name: get("bundle." + name) for name in names}
        layers = [LayerLayout(*(int(arrays[name][i]) for name in names)) for i in range(get("layer_count"))]
        end = region + int(get("region_size"))
        if os.path.getsize(p) < end:
            raise FormatError(f"{p}: truncated (PowerInfer region ends at {end}, file has {os.path.getsize(p)} bytes)")
        predictors: dict[int, dict] = {}
        if K + "predictor.layer" in kv:
            cols = ("layer", "rank", "offset", "threshold", "recall", "precision", "predicted_fraction")
            values = {c: get("predictor." + c) for c in cols}
            for j in range(len(values["layer"])):
                row = {c: values[c][j] for c in cols}
                predictors[[L.layer for L in layers].index(int(row["layer"]))] = row
        sparsity = kv.get(K + "bundle.activation_sparsity", [float("nan")] * len(layers))  # optional key
        return cls(p, get("source.architecture"), get("source.sha256"), get("source.fingerprint"), region, layers,
                   [str(v) for v in get("bundle.activation")], [float(v) for v in get("bundle.activation_threshold")],
                   [float(v) for v in sparsity],
                   [int(v) for v in get("frequency.offset")], [int(v) for v in get("permutation.offset")],
                   [float(v) for v in get("down_requant_rel_rms")], np.memmap(p, mode="r"), predictors)

    def _bytes(self, offset: int, n: int) -> np.ndarray:
        start = self.region_offset + offset
        return np.asarray(self.data[start:start + n])

    def frequency(self, i: int) -> np.ndarray:
        return self._bytes(self.frequency_offsets[i], 4 * self.layers[i].n_ff).view(np.float32)

    def permutation(self, i: int) -> np.ndarray:
        """permutation[j] = source index of neuron j (neurons are stored hot-first)."""
        return self._bytes(self.permutation_offsets[i], 4 * self.layers[i].n_ff).view(np.int32)

    def predictor(self, i: int) -> "Predictor":
        """Layer i's predictor; its outputs are in stored (hot-first) neuron order."""
        from .predictor import Predictor

        if i not in self.predictors:
            raise FormatError(f"{self.path}: layer {self.layers[i].layer} has no predictor")
        info, L = self.predictors[i], self.layers[i]
        r, at = int(info["rank"]), int(info["offset"])
        fc1 = self._bytes(at, 2 * L.n_embd * r).view(np.float16).reshape(L.n_embd, r)
        at = _pad(at + 2 * L.n_embd * r)
        fc2 = self._bytes(at, 2 * r * L.n_ff).view(np.float16).reshape(r, L.n_ff)
        at = _pad(at + 2 * r * L.n_ff)
        bias = self._bytes(at, 4 * L.n_ff).view(np.float32)
        return Predictor(fc1.astype(np.float32), fc2.astype(np.float32), bias.copy(), float(info["threshold"]))

    def bundle_rows(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate rows, up rows, down_t rows) as raw bytes, in stored (hot-first) order."""
        L = self.layers[i]
        gate = np.empty((L.n_ff, L.gate_row_bytes), np.uint8)
        up = np.empty_like(gate)
        down = np.empty((L.n_ff, L.down_row_bytes), np.uint8)
        for c in range(L.n_clusters):
            j0, j1 = c * L.cluster, min((c + 1) * L.cluster, L.n_ff)
            g = self._bytes(L.gate_half(c), (j1 - j0) * L.gate_row_bytes)
            gate[j0:j1] = g.reshape(j1 - j0, L.gate_row_bytes)
            ud = self._bytes(L.updown_half(c), (j1 - j0) * (L.gate_row_bytes + L.down_row_bytes))
            ud = ud.reshape(j1 - j0, L.gate_row_bytes + L.down_row_bytes)
            up[j0:j1] = ud[:, :L.gate_row_bytes]
            down[j0:j1] = ud[:, L.gate_row_bytes:]
        return gate, up, down

    def summary(self) -> str:
        lines = [f"{self.path}: PowerInfer format v{FORMAT_VERSION}, source architecture "
                 f"{self.source_architecture}, {len(self.layers)} bundled layers",
                 "layer  n_ff  types(gate/down_t)  cluster  clusters  bytes        down re-quant rel RMS  "
                 "hot 10% share  held-out sparsity  activation"]
        for i, L in enumerate(self.layers):
            f = self.frequency(i)
            share = f[: max(1, L.n_ff // 10)].sum() / max(float(f.sum()), 1e-12)
            act = self.activations[i]
            if act in THRESHOLDED:
                act = f"|{THRESHOLDED[act]}(gate)| > {self.activation_thresholds[i]:.4g}"
            elif act == "fatrelu":
                act += f" (gate > {self.activation_thresholds[i]:.4g})"
            sparsity = self.activation_sparsity[i]
            measured = "-" if np.isnan(sparsity) else f"{sparsity:.1%}"
            lines.append(f"{L.layer:5d}  {L.n_ff:5d}  {gguf.GGMLQuantizationType(L.gate_type).name:>6}/"
                         f"{gguf.GGMLQuantizationType(L.down_type).name:<6}       {L.cluster:7d}  {L.n_clusters:8d}  "
                         f"{L.bytes:11d}  {self.down_requant_error[i]:21.2e}  {share:12.1%}  {measured:>17}  {act}")
        if self.predictors:
            lines.append("layer  predictor rank  size vs FFN  held-out recall  precision  computed/true active")
            for i, info in sorted(self.predictors.items()):
                L = self.layers[i]
                size = 2 * int(info["rank"]) * (L.n_embd + L.n_ff) + 4 * L.n_ff
                true = float(self.frequency(i).mean())
                lines.append(f"{L.layer:5d}  {int(info['rank']):14d}  {size / (3 * L.n_ff * L.gate_row_bytes):10.1%}  "
                             f"{info['recall']:15.4f}  {info['precision']:9.3f}  "
                             f"{info['predicted_fraction']:.3f}/{true:.3f}")
        disk = os.stat(self.path).st_blocks * 512
        lines.append(f"file: {os.path.getsize(self.path) / 2**30:.3f} GiB apparent, {disk / 2**30:.3f} GiB on disk")
        return "\n".join(lines)


def graph_gate_function(arch: str) -> str:
    """The function an architecture's graph applies to the gate: silu (swiglu) or gelu (geglu)."""
    return _GRAPH_GATE_FUNCTION.get(arch, "silu")


def model_gate_function(path: str | os.PathLike[str]) -> str:
    """The gate function of a model file's graph (a PowerInfer file: its source's)."""
    kv = _header(os.fspath(path), ["general.architecture", K + "source.architecture"])["kv"]
    return graph_gate_function(str(kv.get(K + "source.architecture", kv.get("general.architecture", ""))))


def source_activation(kv: dict) -> str:
    """The activation a source model's FFN computes, from its metadata: the synthetic models
    declare theirs; otherwise the architecture's, thresholded (silu for llama-family graphs)."""
    declared = kv.get("powerinfer.synthetic.activation")
    if isinstance(declared, str) and declared in ACTIVATIONS:
        return declared
    return graph_gate_function(str(kv.get("general.architecture", ""))) + "_threshold"


def resolve_activation(model: str | os.PathLike[str], activation: str) -> str:
    """`activation` checked against the model: "auto" becomes `source_activation`; a
    thresholded activation must threshold the function the graph computes (dense mode runs the
    graph's own)."""
    kv = _header(os.fspath(model), ["general.architecture", "powerinfer.synthetic."])["kv"]
    return _resolve_activation(kv, activation, os.fspath(model))


def _resolve_activation(kv: dict, activation: str, name: str) -> str:
    if activation == "auto":
        activation = source_activation(kv)
    if activation not in ACTIVATIONS:
        raise FormatError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    f = graph_gate_function(str(kv.get("general.architecture", "")))
    if activation in THRESHOLDED and THRESHOLDED[activation] != f:
        raise FormatError(f"{name}: the graph computes {f}(gate) * up, so its thresholded activation is "
                          f"{f}_threshold, not {activation}")
    return activation


def _ffn_layers(tensors: list[dict]) -> dict[int, dict[str, dict]]:
    layers: dict[int, dict[str, dict]] = {}
    for t in tensors:
        m = FFN_NAME.match(t["name"])
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
    return layers


# Re-quantizing a transposed 4-bit matrix into 4-bit blocks again roughly doubles its
# quantization error (Q4_0: 7.7% relative RMS against the source, enough to change greedy
# continuations of the synthetic models); one more bit halves the added error for +22% on down
# alone, about +6% on a 7B file.
_DOWN_T_UPGRADE = {"Q4_0": "Q5_0", "Q4_1": "Q5_1", "Q4_K": "Q5_K", "IQ4_NL": "Q5_0", "IQ4_XS": "Q5_K"}


def down_t_type(src_type: int, n_embd: int) -> int:
    """The type of down_t rows (n_embd elements): the source type, one bit more for 4-bit types,
    Q8_0 when the type's blocks do not divide n_embd."""
    name = gguf.GGMLQuantizationType(src_type).name
    t = int(gguf.GGMLQuantizationType[_DOWN_T_UPGRADE[name]]) if name in _DOWN_T_UPGRADE else src_type
    if _core.row_size(t, n_embd) > 0 and n_embd % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)][0] == 0:
        return t
    return int(gguf.GGMLQuantizationType.Q8_0)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], frequencies: dict[int, np.ndarray],
            *, profile_tokens: int = 0, predictors: Optional[dict[int, tuple["Predictor", "PredictorQuality"]]] = None,
            activation: str = "auto", thresholds: Optional[dict[int, float]] = None,
            sparsity: Optional[dict[int, float]] = None,
            down_t: Optional[dict[int, tuple[int, np.ndarray]]] = None, identity: Optional[str] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> PowerInferFile:
    """Write the PowerInfer file for `src` at `dst` (temp name, then rename).

    `frequencies[layer]` is the per-neuron activation frequency (source order) from a profile;
    `predictors[layer]` a trained predictor (outputs in source order) and its held-out quality.
    `activation` is one of ACTIVATIONS or "auto" (see `source_activation`); `thresholds[layer]`
    the FATReLU threshold or the |f(gate)| threshold of a thresholded silu/gelu layer (0 when
    absent: every neuron with a nonzero f(gate) is active, i.e. no sparsity); `sparsity[layer]`
    the inactive fraction measured on held-out text, shown by `inspect`.
    `down_t[layer]` = (type, rows in source neuron order) replaces transposing ffn_down (a
    PowerInfer file carries it); `identity` is the file whose hashes name the source (default
    `src`)."""
    down_t = down_t or {}
    predictors = predictors or {}
    thresholds = thresholds or {}
    sparsity = sparsity or {}
    src, dst = os.fspath(src), os.fspath(dst)
    header = _header(src, ["general.architecture", "powerinfer.synthetic."])
    arch = header["kv"].get("general.architecture", "")
    if arch == ARCH:
        raise FormatError(f"{src} is already a PowerInfer model")
    activation = _resolve_activation(header["kv"], activation, src)
    ffn = _ffn_layers(header["tensors"])
    if not ffn:
        moe = any(".ffn_gate_exps." in t["name"] for t in header["tensors"])
        raise FormatError(f"{src}: no dense FFN layers (blk.N.ffn_gate/up/down.weight) found"
                          + (" (mixture-of-experts layers are not supported yet)" if moe else "")
                          + f"; supported architectures: {', '.join(SUPPORTED_ARCHS)}")
    if arch not in SUPPORTED_ARCHS:
        raise FormatError(f"{src}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")

    # layout of every bundled layer
    layouts: list[LayerLayout] = []
    offset = 0
    for il in sorted(ffn):
        parts = ffn[il]
        if set(parts) != {"gate", "up", "down"}:
            raise FormatError(f"{src}: layer {il} lacks ffn_{sorted({'gate', 'up', 'down'} - set(parts))[0]}")
        gate, up, down = parts["gate"], parts["up"], parts["down"]
        if len(gate["ne"]) != 2 or up["type"] != gate["type"] or up["ne"] != gate["ne"] or \
                down["ne"] != list(reversed(gate["ne"])):
            raise FormatError(f"{src}: layer {il} has FFN tensors of unexpected shapes or mixed gate/up types")
        n_embd, n_ff = gate["ne"]
        if il not in frequencies or len(frequencies[il]) != n_ff:
            raise FormatError(f"profile has no frequencies for layer {il} (n_ff {n_ff}): was it made for this model?")
        down_type = down_t[il][0] if il in down_t else down_t_type(down["type"], n_embd)
        k = cluster_size(int(_core.row_size(gate["type"], n_embd)), int(_core.row_size(down_type, n_embd)))
        L = LayerLayout(il, n_ff, n_embd, gate["type"], down_type, k, offset)
        layouts.append(L)
        offset = _pad(offset + L.bytes)
    freq_offsets, perm_offsets, pred_offsets = [], [], {}
    for L in layouts:
        freq_offsets.append(offset)
        offset = _pad(offset + 4 * L.n_ff)
        perm_offsets.append(offset)
        offset = _pad(offset + 4 * L.n_ff)
        if L.layer in predictors:
            r = predictors[L.layer][0].rank
            pred_offsets[L.layer] = offset
            offset = _pad(_pad(_pad(offset + 2 * L.n_embd * r) + 2 * r * L.n_ff) + 4 * L.n_ff)

    out = Path(dst)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        _write(src, tmp, arch, layouts, freq_offsets, perm_offsets, offset, frequencies, ffn,
               profile_tokens, predictors, pred_offsets, activation, thresholds, sparsity, down_t, identity or src,
               progress)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return PowerInferFile.open(out)


def _write(src: str, tmp: Path, arch: str, layouts: list[LayerLayout], freq_offsets: list[int],
           perm_offsets: list[int], region_size: int, frequencies: dict[int, np.ndarray],
           ffn: dict[int, dict[str, dict]], profile_tokens: int, predictors: dict, pred_offsets: dict[int, int],
           activation: str, thresholds: dict[int, float], sparsity: dict[int, float],
           given_down_t: dict[int, tuple[int, np.ndarray]],
           identity: str, progress: Optional[Callable[[int, int], None]]) -> None:
    data = np.memmap(src, mode="r")

    def tensor_bytes(t: dict) -> np.ndarray:
        return np.asarray(data[t["offset"]:t["offset"] + t["nbytes"]])

    steps = len(layouts) * 2 + 1
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    # ffn_down transposed, hot-first: the only lossy step, measured before the header is written
    perms = {L.layer: np.argsort(-frequencies[L.layer], kind="stable").astype(np.int32) for L in layouts}
    down_t: dict[int, np.ndarray] = {}
    errors: list[float] = []
    for L in layouts:
        if L.layer in given_down_t:
            rows = given_down_t[L.layer][1].reshape(L.n_ff, L.down_row_bytes)
            down_t[L.layer] = np.ascontiguousarray(rows[perms[L.layer]])
            errors.append(0.0)
            step()
            continue
        d = ffn[L.layer]["down"]
        dense = _core.dequantize_rows(d["type"], tensor_bytes(d), L.n_ff)  # (n_embd, n_ff)
        t = np.ascontiguousarray(dense.T[perms[L.layer]])                # (n_ff, n_embd)
        q = _core.quantize_rows(L.down_type, t)
        back = _core.dequantize_rows(L.down_type, q.reshape(-1), L.n_embd)
        errors.append(float(np.sqrt(np.mean((back - t) ** 2)) / max(float(np.sqrt(np.mean(t ** 2))), 1e-30)))
        down_t[L.layer] = q
        step()

    w = _core.GgufHeaderWriter(src, ALIGN)
    w.set_str("general.architecture", ARCH)  # stock llama.cpp refuses the file
    w.set_u32(K + "format_version", FORMAT_VERSION)
    w.set_str(K + "source.architecture", arch)
    w.set_str(K + "source.sha256", _sha256(identity))
    w.set_str(K + "source.fingerprint", fingerprint(identity))
    w.set_u64(K + "region_size", region_size)
    w.set_u32(K + "layer_count", len(layouts))
    w.set_u64(K + "profile.tokens", profile_tokens)
    for name in ("layer", "n_ff", "n_embd", "gate_type", "down_type", "cluster"):
        w.set_u32_array(K + "bundle." + name, [getattr(L, name) for L in layouts])
    w.set_u64_array(K + "bundle.offset", [L.offset for L in layouts])
    w.set_str_array(K + "bundle.activation", [activation] * len(layouts))
    w.set_f32_array(K + "bundle.activation_threshold", [float(thresholds.get(L.layer, 0.0)) for L in layouts])
    w.set_f32_array(K + "bundle.activation_sparsity", [float(sparsity.get(L.layer, np.nan)) for L in layouts])
    w.set_u64_array(K + "frequency.offset", freq_offsets)
    w.set_u64_array(K + "permutation.offset", perm_offsets)
    w.set_f32_array(K + "down_requant_rel_rms", errors)
    if predictors:
        rows = [(L, *predictors[L.layer]) for L in layouts if L.layer in predictors]
        w.set_u32_array(K + "predictor.layer", [L.layer for L, _, _ in rows])
        w.set_u32_array(K + "predictor.rank", [p.rank for _, p, _ in rows])
        w.set_u64_array(K + "predictor.offset", [pred_offsets[L.layer] for L, _, _ in rows])
        w.set_f32_array(K + "predictor.threshold", [p.threshold for _, p, _ in rows])
        w.set_f32_array(K + "predictor.recall", [q.recall for _, _, q in rows])
        w.set_f32_array(K + "predictor.precision", [q.precision for _, _, q in rows])
        w.set_f32_array(K + "predictor.predicted_fraction", [q.predicted_fraction for _, _, q in rows])
    tensors = w.add_source_tensors()
    meta = w.meta()

    with open(tmp, "wb") as f:
        f.write(meta)
        data_start = len(meta)
        data_end = data_start
        for t in tensors:
            dst_at = data_start + t["dst_offset"]
            data_end = _pad(dst_at + t["nbytes"])
            if not FFN_NAME.match(t["name"]):  # FFN regions stay holes: the FFN lives in the bundles
                f.seek(dst_at)
                f.write(tensor_bytes(t).tobytes())
        region = _pad(data_end)
        step()
        for L in layouts:
            perm = perms[L.layer]
            gate = tensor_bytes(ffn[L.layer]["gate"]).reshape(L.n_ff, L.gate_row_bytes)[perm]
            up = tensor_bytes(ffn[L.layer]["up"]).reshape(L.n_ff, L.gate_row_bytes)[perm]
            for c in range(L.n_clusters):
                j0, j1 = c * L.cluster, min((c + 1) * L.cluster, L.n_ff)
                f.seek(region + L.gate_half(c))
                f.write(gate[j0:j1].tobytes())
                f.seek(region + L.updown_half(c))
                f.write(np.concatenate([up[j0:j1], down_t[L.layer][j0:j1]], axis=1).tobytes())
            step()
        for L, fo, po in zip(layouts, freq_offsets, perm_offsets):
            f.seek(region + fo)
            f.write(frequencies[L.layer][perms[L.layer]].astype(np.float32).tobytes())
            f.seek(region + po)
            f.write(perms[L.layer].tobytes())
        for L in layouts:
            if L.layer not in predictors:
                continue
            p, perm = predictors[L.layer][0], perms[L.layer]
            at = region + pred_offsets[L.layer]
            f.seek(at)
            f.write(p.fc1.astype(np.float16).tobytes())
            at = _pad(at + 2 * L.n_embd * p.rank)
            f.seek(at)
            f.write(np.ascontiguousarray(p.fc2[:, perm]).astype(np.float16).tobytes())
            at = _pad(at + 2 * p.rank * L.n_ff)
            f.seek(at)
            f.write(p.bias[perm].astype(np.float32).tobytes())
        f.truncate(region + region_size)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
