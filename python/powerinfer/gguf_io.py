"""Writing a GGUF from a header (``_core.GgufHeaderWriter``) and per-tensor bytes, atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


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
