"""Bad input gets a clear Python exception, never a crash."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import powerinfer
from conftest import THREADS


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(powerinfer.ModelFileError, match="does not exist"):
        powerinfer.Llama(str(tmp_path / "nope.gguf"))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(powerinfer.ModelFileError, match="directory"):
        powerinfer.Llama(str(tmp_path))


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"this is a text file, not a model\n" * 100)
    with pytest.raises(powerinfer.ModelFileError, match="not a GGUF"):
        powerinfer.Llama(str(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(powerinfer.ModelFileError, match="not a GGUF"):
        powerinfer.Llama(str(path))


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_gguf(tiny_model: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_model.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(powerinfer.ModelFileError, match="truncated|corrupt"):
        powerinfer.Llama(str(path))


def test_is_a_value_error_like_stock(tmp_path: Path) -> None:
    """Code that catches stock's ValueError keeps working."""
    with pytest.raises(ValueError):
        powerinfer.Llama(str(tmp_path / "nope.gguf"))


def test_memory_budget_not_yet_supported(tiny_model: Path) -> None:
    with pytest.raises(NotImplementedError, match="memory_budget"):
        powerinfer.Llama(str(tiny_model), memory_budget="4GiB")


def test_file_truncated_while_running_on_disk(tiny_model: Path, tmp_path: Path) -> None:
    """An I/O error mid-token fails that call with an exception; the process survives."""
    path = tmp_path / "shrinking.gguf"
    shutil.copy(tiny_model, path)
    llm = powerinfer.Llama(str(path), ffn_on_disk=True, n_ctx=128, n_threads=THREADS, verbose=False)
    assert llm("hello", max_tokens=2, temperature=0)["choices"]
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(RuntimeError):
        llm("hello again", max_tokens=4, temperature=0)
    llm.close()


def test_wrong_llama_cpp_python_version(tmp_path: Path) -> None:
    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\n')
    code = textwrap.dedent("""
        try:
            import powerinfer
        except ImportError as exc:
            print(exc)
            raise SystemExit(3)
        raise SystemExit(0)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 3, proc.stderr
    assert "0.0.1" in proc.stdout and powerinfer.LLAMA_CPP_PYTHON_VERSION in proc.stdout


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_corrupted_header_never_crashes(tiny_model: Path, tmp_path: Path, data: st.DataObject) -> None:
    """Flip bytes anywhere in the GGUF header and tensor table: the check either accepts the file
    or raises ModelFileError; it never crashes the process or hangs."""
    raw = bytearray(tiny_model.read_bytes())
    header_end = _header_size(str(tiny_model))
    n_flips = data.draw(st.integers(1, 8))
    for _ in range(n_flips):
        pos = data.draw(st.integers(0, header_end - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(raw))
    try:
        powerinfer.llama.check_model_file(path)
    except powerinfer.ModelFileError:
        pass


@functools.lru_cache(maxsize=None)
def _header_size(path: str) -> int:
    """Bytes before the tensor data of a GGUF file."""
    import gguf

    return int(gguf.GGUFReader(path).data_offset)
