"""Models in PowerInfer's own GGUF format (magic ``PWRI``), imported without training.

Such a file is a GGUF whose magic reads ``PWRI``, with per layer the predictor
(``blk.N.fc1.weight``: n_embd -> rank, ``blk.N.fc2.weight``: rank -> n_ff; a neuron is computed when
``fc2 . relu(fc1 . x) >= powerinfer.sparse_threshold``) and the down projection transposed
(``blk.N.ffn_down_t.weight``), with or without ``ffn_down`` itself. Importing:

1. ``to_plain_gguf`` writes an ordinary GGUF of the same model (predictor tensors dropped,
   ``ffn_down`` rebuilt from ``ffn_down_t`` if the file lacks it) that llama.cpp can run, so the
   model can be profiled for the hot-first order;
2. ``predictors`` and ``down_t_rows`` hand the file's own predictors and ``ffn_down_t`` rows to
   ``format.convert``: no training, and no re-quantization of down.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from . import _core
from .format import FormatError
from .gguf_io import tensor_data, tensor_matrix, write_gguf
from .predictor import Predictor

MAGIC = b"PWRI"
THRESHOLD_KEY = "powerinfer.sparse_threshold"
_PREDICTOR = re.compile(r"^blk\.(\d+)\.(fc1|fc2|ffn_down_t)\.weight$")
# the GGUF header (metadata, vocabulary, tensor infos) is far smaller than this
_HEADER_BYTES_MAX = 256 << 20


def is_pwri(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


@contextlib.contextmanager
def gguf_view(path: str | os.PathLike[str], head_bytes: int = _HEADER_BYTES_MAX) -> Iterator[str]:
    """A path at which the PWRI file reads as a GGUF with the same offsets: a sparse temp file
    holding the first `head_bytes` (at least the header) with the GGUF magic, the size of the
    original (data is read from the original)."""
    size = os.path.getsize(path)
    fd, tmp = tempfile.mkstemp(prefix="powerinfer-pwri-", suffix=".gguf")
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            head = bytearray(src.read(min(size, head_bytes)))
            head[:4] = b"GGUF"
            dst.write(head)
            dst.truncate(size)
        yield tmp
    finally:
        os.unlink(tmp)


def _parse(view: str) -> dict:
    try:
        return _core.read_gguf_header(view, [])
    except ValueError as exc:
        raise FormatError(f"corrupt PowerInfer (PWRI) file: {exc}") from None


@functools.lru_cache(maxsize=4)
def _cached_header(path: str, size: int, mtime_ns: int) -> dict:
    with gguf_view(path) as view:
        return _parse(view)


def header(path: str | os.PathLike[str]) -> dict:
    """The PWRI file's metadata and tensor infos (``_core.read_gguf_header`` form), parsed once
    per file version: each parse copies the header to a temp file."""
    p = os.fspath(path)
    st = os.stat(p)
    return _cached_header(p, st.st_size, st.st_mtime_ns)


def _tensors(header: dict) -> dict[str, dict]:
    return {t["name"]: t for t in header["tensors"]}


def predictors(path: str | os.PathLike[str]) -> dict[int, Predictor]:
    """Each layer's predictor, outputs in the file's neuron order."""
    p = os.fspath(path)
    h = header(p)
    threshold = float(h["kv"].get(THRESHOLD_KEY, 0.0))
    tensors = _tensors(h)
    out: dict[int, Predictor] = {}
    for name, t in tensors.items():
        m = _PREDICTOR.match(name)
        if not m or m.group(2) != "fc1":
            continue
        il = int(m.group(1))
        fc2 = tensors.get(f"blk.{il}.fc2.weight")
        if fc2 is None or fc2["ne"][0] != t["ne"][1]:
            raise FormatError(f"{p}: layer {il} has fc1 but no matching fc2")
        w1 = tensor_matrix(p, t)    # (rank, n_embd)
        w2 = tensor_matrix(p, fc2)  # (n_ff, rank)
        out[il] = Predictor(np.ascontiguousarray(w1.T), np.ascontiguousarray(w2.T),
                            np.zeros(w2.shape[0], np.float32), threshold)
    return out


def down_t_rows(path: str | os.PathLike[str]) -> dict[int, tuple[int, np.ndarray]]:
    """Each layer's ffn_down_t as (ggml type, raw rows: n_ff rows of n_embd), file order."""
    p = os.fspath(path)
    out: dict[int, tuple[int, np.ndarray]] = {}
    for name, t in _tensors(header(p)).items():
        m = _PREDICTOR.match(name)
        if m and m.group(2) == "ffn_down_t":
            out[int(m.group(1))] = (int(t["type"]), tensor_data(p, t))
    return out


def _down_type(down_t_type: int, n_ff: int) -> int:
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(down_t_type)][0]
    return down_t_type if n_ff % block == 0 else int(gguf.GGMLQuantizationType.F16)


def to_plain_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write the model of a PWRI file as an ordinary GGUF (temp name, then rename)."""
    src_p, out = os.fspath(src), Path(dst)
    if not is_pwri(src_p):
        raise FormatError(f"{src_p}: not a PowerInfer (PWRI) file")
    h = header(src_p)
    tensors = _tensors(h)
    with gguf_view(src_p, int(h["data_offset"])) as view:
        skip = [n for n in tensors if _PREDICTOR.match(n)]
        add = []
        for name in skip:
            m = _PREDICTOR.match(name)
            assert m is not None
            down = f"blk.{m.group(1)}.ffn_down.weight"
            if m.group(2) == "ffn_down_t" and down not in tensors:
                n_embd, n_ff = tensors[name]["ne"]
                add.append((down, _down_type(tensors[name]["type"], n_ff), [n_ff, n_embd]))
        w = _core.GgufHeaderWriter(view, int(h["alignment"]))
        infos = w.add_source_tensors(skip, add)
        meta = w.meta()

    def tensor_bytes(t: dict) -> bytes:
        if t["offset"] is not None:
            return tensor_data(src_p, t).tobytes()
        dense = tensor_matrix(src_p, tensors[t["name"].replace("ffn_down", "ffn_down_t")]).T  # (n_embd, n_ff)
        return _core.quantize_rows(t["type"], np.ascontiguousarray(dense)).tobytes()

    return write_gguf(out, meta, infos, tensor_bytes)
