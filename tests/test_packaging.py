"""The pin is stated once per place that needs it, and the places agree."""
from __future__ import annotations

import re
from pathlib import Path

import llama_cpp

import powerinfer

ROOT = Path(__file__).resolve().parent.parent


def test_pins_agree() -> None:
    pin = (ROOT / "vendor" / "llama-cpp-python.pin").read_text()
    version = re.search(r"^version = (\S+)$", pin, re.M).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert version == powerinfer.LLAMA_CPP_PYTHON_VERSION == llama_cpp.__version__
    assert pyproject.count(f'"llama-cpp-python=={version}"') == 2  # build and run time


def test_backend_is_in_libllamas_registry() -> None:
    assert "PowerInfer" in powerinfer._core.registered_device_names()
    assert "CPU" in powerinfer._core.registered_device_names()
