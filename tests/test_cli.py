"""The powerinfer command line."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import powerinfer
from conftest import THREADS
from powerinfer.chat import chat_loop
from powerinfer.units import parse_size


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "powerinfer", *args], capture_output=True, text=True, timeout=600,
                          input=stdin)


@pytest.mark.parametrize("command", ["make-test-model", "bench", "profile", "convert", "sparse-quality", "inspect", "run", "chat",
                                     "serve", "demo"])
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


def test_bench_runs_repetitions_in_rounds(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round runs every mode once (a slow spell of the machine hits all of them alike), the
    modes of a round on the same seed; speeds are gathered per mode, the stats are the last
    round's."""
    import json
    from powerinfer import bench

    calls: list[tuple[str, int]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        mode, reps, seed = cmd[4], int(cmd[9]), int(cmd[10])
        calls.append((mode, seed))
        assert reps == 1
        out = {"results": {"pp8": [100.0 + len(calls)], "tg4": [10.0 + len(calls)]},
               "peak_rss_bytes": 1000 * len(calls), "stats": {"neurons_total": 10, "neurons_predicted": len(calls), "neurons_active": 1}}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(out) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    rows = bench.run(str(tiny_model), modes=("stock", "ram"), threads=1, n_prompt=8, n_gen=4, reps=3, seed=5)
    assert calls == [("stock", 5), ("ram", 5), ("stock", 6), ("ram", 6), ("stock", 7), ("ram", 7)]
    by = {(r.mode, r.test): r for r in rows}
    assert by["stock", "pp8"].tokens_per_second == [101.0, 103.0, 105.0]
    assert by["ram", "tg4"].tokens_per_second == [12.0, 14.0, 16.0]
    assert by["ram", "tg4"].peak_rss_bytes == 6000
    assert by["stock", "pp8"].stats == {"neurons_total": 10, "neurons_predicted": 5, "neurons_active": 1}
    table = bench.format_table(str(tiny_model), rows, threads=1)
    assert "powerinfer (RAM) tg4 vs stock, round by round: 1.09x, 1.08x, 1.07x" in table


def test_clear_error_for_a_bad_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    proc = _cli("run", str(bad), "-p", "hi")
    assert proc.returncode == 1
    assert "not a GGUF" in proc.stderr and "Traceback" not in proc.stderr


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("8g") == 8 * 10**9
    assert parse_size("123") == 123
    for bad in ("", "GiB", "4 parsecs", "-1GiB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_memory_budget_is_a_clear_error(tiny_model: Path) -> None:
    for command in (["serve", str(tiny_model)], ["run", str(tiny_model), "-p", "hi"], ["chat", str(tiny_model)]):
        proc = _cli(*command, "--memory-budget", "4GiB")
        assert proc.returncode == 1
        assert "--memory-budget is not available yet" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("serve", str(tiny_model), "--memory-budget", "lots")
    assert proc.returncode == 2 and "not a size" in proc.stderr


def test_chat_from_stdin(tiny_model: Path) -> None:
    """Piped chat: one reply per line, history kept, /reset forgets it; the GGUF's template."""
    proc = _cli("chat", str(tiny_model), "-n", "8", "--temperature", "0", "-t", str(THREADS), "-c", "512",
                stdin="hello\nhow are you\n/reset\nhow are you\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "no chat template" not in proc.stderr
    llm = powerinfer.Llama(str(tiny_model), n_ctx=512, n_threads=THREADS, verbose=False)

    def reply(messages: list[dict[str, str]]) -> str:
        out = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0)
        return out["choices"][0]["message"]["content"]

    first = reply([{"role": "user", "content": "hello"}])
    second = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "how are you"}])
    fresh = reply([{"role": "user", "content": "how are you"}])
    llm.close()
    assert proc.stdout == f"{first}\n{second}\n{fresh}\n"


def test_chat_drops_old_exchanges_when_the_context_is_full(tiny_model: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # n_ctx a multiple of 256: llama.cpp pads the context to one, and llama-cpp-python's token
    # buffer would then be shorter than the context it checks prompts against
    llm = powerinfer.Llama(str(tiny_model), n_ctx=256, n_threads=THREADS, verbose=False)
    lines = ["tell me something about sparse neurons and flash storage"] * 6 + ["x " * 300, "one more thing"]
    out = io.StringIO()
    assert chat_loop(llm, io.StringIO("\n".join(lines) + "\n"), out, max_tokens=8, temperature=0.0) == 0
    llm.close()
    err = capsys.readouterr().err
    assert "dropped the oldest exchange" in err
    assert "message too long for the context (256 tokens)" in err
    assert out.getvalue().count("\n") == len(lines) - 1  # every message answered but the too-long one
