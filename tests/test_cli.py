"""The powerinfer command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "powerinfer", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["make-test-model", "bench", "run", "demo"])
def test_help(command: str) -> None:
    proc = _cli(command, "--help")
    assert proc.returncode == 0
    assert "usage: powerinfer " + command in proc.stdout


def test_make_test_model_then_bench_and_run(tmp_path: Path) -> None:
    model = tmp_path / "t.gguf"
    proc = _cli("make-test-model", str(model), "--preset", "tiny", "--type", "q8_0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert model.exists() and "2 layers" in proc.stdout

    proc = _cli("bench", str(model), "-p", "16", "-n", "8", "-r", "1", "-t", "2", "--modes", "stock,ram,disk")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| t.gguf")]
    assert len(rows) == 6  # three configurations x (pp, tg)
    assert any("powerinfer (disk)" in r and "tg8" in r for r in rows)

    proc = _cli("run", str(model), "-p", "hello", "-n", "4", "--temperature", "0", "--stats", "--ffn-on-disk")
    assert proc.returncode == 0, proc.stderr
    assert "ffn_bytes_read" in proc.stderr


def test_clear_error_for_a_bad_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    proc = _cli("run", str(bad), "-p", "hi")
    assert proc.returncode == 1
    assert "not a GGUF" in proc.stderr and "Traceback" not in proc.stderr
