"""Byte sizes as people write them: ``4GiB``, ``512 MiB``, ``1.5GB``, ``2000000``."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`. Decimal units (kB, MB, GB, TB; bare K/M/G/T too) are powers of 1000,
    binary ones (KiB, MiB, GiB, TiB) powers of 1024. Raises ValueError on anything else."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4GiB, 512MiB, 8GB, 1000000)")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"size must be at least one byte: {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps it at least 1 (``1.5 GiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
