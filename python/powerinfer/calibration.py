"""Calibration text, generated on the fly: no text corpus is shipped or downloaded.

The default corpus is the docstrings of a fixed list of Python standard library modules (and of
their public classes and functions): English prose mixed with code, tens of thousands of tokens,
the same on every machine with the same Python version. A user's own text file can replace it.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from pathlib import Path
from typing import Iterator

# Modules with rich docstrings and no side effects on import.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "builtins",
    "bz2", "calendar", "cmd", "codecs", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum", "fnmatch",
    "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "lzma", "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "platform", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shlex", "shutil", "signal", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "traceback",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of STDLIB_MODULES and their public members, deduplicated, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []

    def add(doc: str | None) -> None:
        if doc and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            out.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io ...) warn when touched
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            add(inspect.getdoc(module))
            for attr in sorted(vars(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr)
                if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)) and \
                        getattr(obj, "__module__", None) == module.__name__:
                    add(inspect.getdoc(obj))
    return out


PARTS = ("train", "validation", "held_out")


def part_of(text: str) -> str:
    """A stable three-way split by content hash (80 / 10 / 10 %): the same text always lands in
    the same part, whatever the order, and the parts share no document."""
    digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
    u = int.from_bytes(digest[:4], "little") / 2**32
    return "held_out" if u < 0.1 else ("validation" if u < 0.2 else "train")


def is_held_out(text: str) -> bool:
    return part_of(text) == "held_out"


def calibration_texts(path: str | Path | None = None, held_out: bool = False,
                      part: str | None = None) -> Iterator[str]:
    """Calibration texts of one part (default: train, or held_out when `held_out`): a user's
    file split into paragraphs, or the standard library's docstrings. The train part includes
    the validation part unless `part` asks for one of them explicitly."""
    if path is not None:
        raw = Path(path).read_text(encoding="utf-8", errors="replace")
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
        if not texts:
            raise ValueError(f"calibration file {path} holds no text")
    else:
        texts = stdlib_docstrings()
    if part is not None and part not in PARTS:
        raise ValueError(f"unknown part {part!r}; one of {', '.join(PARTS)}")
    wanted = {part} if part is not None else ({"held_out"} if held_out else {"train", "validation"})
    for text in texts:
        if part_of(text) in wanted:
            yield text
