"""llama-bench style benchmark: stock llama-cpp-python and PowerInfer on one model, in one run.

Every configuration runs in a fresh subprocess, one after the other, so that each has its own
peak RSS and none inherits another's allocations. Like llama-bench, the tokens are random:
prompt processing (pp) decodes n_prompt tokens as one batch on an empty cache, text generation
(tg) decodes n_gen tokens one at a time, both after a warm-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

MODES = ("stock", "ram", "disk")

MODE_LABELS = {
    "stock": "llama-cpp-python",
    "ram": "powerinfer (RAM)",
    "disk": "powerinfer (disk)",
}


@dataclasses.dataclass
class BenchRow:
    mode: str
    test: str
    tokens_per_second: list[float]
    peak_rss_bytes: int

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tokens_per_second)

    @property
    def std(self) -> float:
        return statistics.stdev(self.tokens_per_second) if len(self.tokens_per_second) > 1 else 0.0


def _open(mode: str, model: str, threads: int, n_ctx: int, n_batch: int) -> Any:
    kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                  n_threads_batch=threads, verbose=False)
    if mode == "stock":
        import llama_cpp
        return llama_cpp.Llama(model, **kwargs)
    import powerinfer
    return powerinfer.Llama(model, ffn_on_disk=(mode == "disk"), **kwargs)


def _decode(llm: Any, tokens: Sequence[int], n_past: int) -> None:
    for start in range(0, len(tokens), llm.n_batch):
        chunk = tokens[start:start + llm.n_batch]
        llm._batch.set_batch(chunk, n_past=n_past + start, logits_all=False)
        llm._ctx.decode(llm._batch)


def _worker(mode: str, model: str, threads: int, n_prompt: int, n_gen: int, reps: int, seed: int) -> dict[str, Any]:
    import numpy as np

    n_ctx = max(n_prompt, n_gen) + 16
    llm = _open(mode, model, threads, n_ctx, n_batch=max(1, min(512, n_prompt)))
    rng = np.random.default_rng(seed)
    n_vocab = llm.n_vocab()
    # skip the first ids: they are usually special tokens
    def tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(min(300, n_vocab - 1), n_vocab, size=n)]

    def speeds(n: int, one_at_a_time: bool) -> list[float]:
        out = []
        for _ in range(reps):
            batch = tokens(n)
            llm._ctx.kv_cache_clear()
            t0 = time.perf_counter()
            if one_at_a_time:
                for i, tok in enumerate(batch):
                    _decode(llm, [tok], i)
            else:
                _decode(llm, batch, 0)
            out.append(n / (time.perf_counter() - t0))
        return out

    _decode(llm, tokens(min(8, n_ctx)), 0)  # warm-up
    result: dict[str, list[float]] = {}
    if n_prompt > 0:
        result[f"pp{n_prompt}"] = speeds(n_prompt, one_at_a_time=False)
    if n_gen > 0:
        result[f"tg{n_gen}"] = speeds(n_gen, one_at_a_time=True)
    stats = llm.powerinfer_stats() if hasattr(llm, "powerinfer_stats") else None
    llm.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"results": result, "peak_rss_bytes": peak, "stats": stats}


def run(model: str, modes: Sequence[str] = MODES, threads: int | None = None, n_prompt: int = 512,
        n_gen: int = 128, reps: int = 3, seed: int = 0,
        progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Benchmark each mode in its own process; `progress(mode)` is called as each one starts."""
    threads = threads or max(1, os.cpu_count() or 1)
    rows: list[BenchRow] = []
    for mode in modes:
        if progress is not None:
            progress(mode)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        cmd = [sys.executable, "-m", "powerinfer.bench", "--worker", mode, model, str(threads),
               str(n_prompt), str(n_gen), str(reps), str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {mode} failed:\n{proc.stderr[-4000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        for test, speeds in out["results"].items():
            rows.append(BenchRow(mode, test, speeds, out["peak_rss_bytes"]))
    return rows


def format_table(model: str, rows: Sequence[BenchRow], threads: int) -> str:
    size_gib = os.path.getsize(model) / 2**30
    base = {r.test: r.mean for r in rows if r.mode == "stock"}
    lines = [
        "| model | size | backend | threads | test | t/s | vs stock | peak RSS |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    name = os.path.basename(model)
    for r in rows:
        ratio = f"{r.mean / base[r.test]:.2f}x" if r.test in base else "-"
        lines.append(
            f"| {name} | {size_gib:.2f} GiB | {MODE_LABELS[r.mode]} | {threads} | {r.test} "
            f"| {r.mean:.2f} ± {r.std:.2f} | {ratio} | {r.peak_rss_bytes / 2**20:.0f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _mode, _model, _threads, _np, _ng, _reps, _seed = sys.argv[2:9]
    print(json.dumps(_worker(_mode, _model, int(_threads), int(_np), int(_ng), int(_reps), int(_seed))))
