#!/usr/bin/env python3
"""Fetch the pinned llama-cpp-python sdist and extract the ggml headers we compile against.

The wheel installs ggml's public headers but not ggml-backend-impl.h, whose struct layouts a
run-time backend must match exactly. So we take every header from the pinned sdist, checked by
sha256, and extract only those into an ignored folder. Nothing third-party is committed.

Usage: fetch_headers.py OUT_DIR   (prints OUT_DIR/include on success)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "llama-cpp-python.pin"

# Paths inside the sdist (relative to its top folder) -> file name in OUT_DIR/include.
GGML_ROOT = "vendor/llama.cpp/ggml"
HEADERS = [
    f"{GGML_ROOT}/src/ggml-backend-impl.h",
    f"{GGML_ROOT}/include/ggml.h",
    f"{GGML_ROOT}/include/ggml-alloc.h",
    f"{GGML_ROOT}/include/ggml-backend.h",
    f"{GGML_ROOT}/include/ggml-cpu.h",
    f"{GGML_ROOT}/include/gguf.h",
]


def read_pin() -> dict[str, str]:
    pin: dict[str, str] = {}
    for line in PIN_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        pin[key.strip()] = value.strip()
    for key in ("version", "sdist", "sha256"):
        if key not in pin:
            raise SystemExit(f"{PIN_FILE}: missing '{key}'")
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ggml-powerinfer"


def pip_commands() -> list[list[str]]:
    """pip may be missing inside an isolated build environment: also try the one on PATH."""
    cmds = [[sys.executable, "-m", "pip"]]
    on_path = shutil.which("pip3") or shutil.which("pip")
    if on_path:
        cmds.append([on_path])
    return cmds


def download_sdist(pin: dict[str, str], dest: Path) -> Path:
    target = dest / pin["sdist"]
    if target.exists() and sha256_of(target) == pin["sha256"]:
        return target
    spec = f"llama-cpp-python=={pin['version']}"
    errors = []
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        for pip in pip_commands():
            # --no-build-isolation avoids building llama-cpp-python's build deps just to read
            # its metadata; the second try lets pip set them up if this interpreter lacks them.
            for extra in (["--no-build-isolation"], []):
                cmd = pip + ["download", "--no-deps", "--no-binary", "llama-cpp-python",
                             *extra, "-d", tmp, spec]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / pin["sdist"]
                if proc.returncode == 0 and got.exists():
                    digest = sha256_of(got)
                    if digest != pin["sha256"]:
                        raise SystemExit(f"sha256 mismatch for {got.name}: got {digest}, "
                                         f"pinned {pin['sha256']}")
                    os.replace(got, target)
                    return target
                errors.append(f"$ {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    raise SystemExit("could not download the pinned llama-cpp-python sdist:\n" + "\n".join(errors))


def extract_headers(sdist: Path, version: str, out_include: Path) -> None:
    top = f"llama_cpp_python-{version}"
    tmp_dir = Path(tempfile.mkdtemp(dir=out_include.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for rel in HEADERS:
                member = tar.getmember(f"{top}/{rel}")
                src = tar.extractfile(member)
                if src is None:
                    raise SystemExit(f"{rel} is not a file in {sdist.name}")
                (tmp_dir / Path(rel).name).write_bytes(src.read())
        if out_include.exists():
            shutil.rmtree(out_include)
        os.replace(tmp_dir, out_include)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1]).resolve()
    pin = read_pin()
    out_include = out / "include"
    stamp = out / "version"
    if stamp.exists() and stamp.read_text().strip() == pin["sha256"] and out_include.is_dir():
        print(out_include)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist(pin, cache)
    extract_headers(sdist, pin["version"], out_include)
    stamp.write_text(pin["sha256"] + "\n")
    print(out_include)
    return 0


if __name__ == "__main__":
    sys.exit(main())
