"""GGUF tensors read as float32 matrices, and a GGUF written from a header
(``_core.GgufHeaderWriter``) and per-tensor bytes, atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def tensor_data(path: str, t: dict) -> np.ndarray:
    """The stored bytes of tensor `t` (a ``_core.read_gguf_header`` tensor info) of file `path`."""
    from .format import FormatError  # format imports this module

    with open(path, "rb") as f:
        f.seek(t["offset"])
        data = np.frombuffer(f.read(t["nbytes"]), np.uint8)
    if len(data) != t["nbytes"]:
        raise FormatError(f"{path}: truncated (tensor {t['name']})")
    return data


def tensor_matrix(path: str, t: dict) -> np.ndarray:
    """A 2-D tensor as float32, shape (ne1, ne0), dequantized by ggml."""
    from . import _core

    return _core.dequantize_rows(t["type"], tensor_data(path, t), t["ne"][0])


def gate_matrices(path: str | os.PathLike[str]) -> Callable[[int], Optional[tuple[np.ndarray, int]]]:
    """Layer -> its ffn_gate matrix as float32 (n_ff x n_embd) and its stored bytes, or None if
    the layer has no plain ffn_gate."""
    from . import _core

    p = os.fspath(path)
    tensors = {t["name"]: t for t in _core.read_gguf_header(p, ["general.architecture"])["tensors"]}

    def gate(il: int) -> Optional[tuple[np.ndarray, int]]:
        t = tensors.get(f"blk.{il}.ffn_gate.weight")
        return None if t is None else (tensor_matrix(p, t), int(t["nbytes"]))

    return gate


def write_gguf(out: Path, meta: bytes, infos: list[dict], tensor_bytes: Callable[[dict], bytes]) -> Path:
    """Write `meta` then each tensor of `infos` at its ``dst_offset`` to a temp name, then rename:
    an interrupted or failed write leaves no partial file at `out`."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(meta)
            for t in infos:
                f.seek(len(meta) + t["dst_offset"])
                f.write(tensor_bytes(t))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
