"""llama-bench style benchmark: stock llama-cpp-python and PowerInfer on one model, in one run.

Every configuration runs in a fresh subprocess, so that each has its own peak RSS and none
inherits another's allocations, and the repetitions go in rounds: each round runs every
configuration once, one after the other, so that a slow spell of a noisy machine falls on all of
them alike rather than on whichever ran then. Like llama-bench, the tokens are random:
prompt processing (pp) decodes n_prompt tokens as one batch on an empty cache, text generation
(tg) decodes n_gen tokens one at a time, both after a warm-up.

For a PowerInfer model the modes are `dense` (its FFN dense, as the source model) and `sparse`
(predictor-gated decode); `stock` then runs the source GGUF (`source=`). Random tokens are not
what a sparse model sees when it generates, so `tg` there decodes the model's own greedy
continuation of a text prompt (`--tg-text`, the default for PowerInfer models; every mode of
the run does the same).
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

MODES = ("stock", "ram", "disk", "dense", "sparse")

MODE_LABELS = {
    "stock": "llama-cpp-python",
    "ram": "powerinfer (RAM)",
    "disk": "powerinfer (disk)",
    "dense": "powerinfer (dense)",
    "sparse": "powerinfer (sparse)",
}

# the prompt of text-generation runs: ordinary prose the calibration text resembles
TG_PROMPT = "Return a new list containing all items from the iterable in ascending order. The"


@dataclasses.dataclass
class BenchRow:
    mode: str
    test: str
    tokens_per_second: list[float]
    peak_rss_bytes: int
    stats: dict[str, Any] | None = None

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
    if mode in ("dense", "sparse"):
        return powerinfer.Llama(model, sparse=(mode == "sparse"), **kwargs)
    return powerinfer.Llama(model, ffn_on_disk=(mode == "disk"), **kwargs)


def _decode(llm: Any, tokens: Sequence[int], n_past: int) -> None:
    for start in range(0, len(tokens), llm.n_batch):
        chunk = tokens[start:start + llm.n_batch]
        llm._batch.set_batch(chunk, n_past=n_past + start, logits_all=False)
        llm._ctx.decode(llm._batch)


def _worker(mode: str, model: str, threads: int, n_prompt: int, n_gen: int, reps: int, seed: int,
            tg_text: bool = False) -> dict[str, Any]:
    import numpy as np

    n_ctx = max(n_prompt, n_gen + 64) + 16
    llm = _open(mode, model, threads, n_ctx, n_batch=max(1, min(512, n_prompt)))
    rng = np.random.default_rng(seed)
    n_vocab = llm.n_vocab()
    # skip the first ids: they are usually special tokens
    def tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(min(300, n_vocab - 1), n_vocab, size=n)]

    def generated(n: int) -> list[float]:
        """Speed of greedy decoding of n tokens after the text prompt (prompt not timed)."""
        prompt = llm.tokenize(TG_PROMPT.encode())
        out = []
        for _ in range(reps):
            llm._ctx.kv_cache_clear()
            _decode(llm, prompt, 0)
            tok, elapsed = None, 0.0
            for i in range(n):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                tok = int(logits.argmax())
                t0 = time.perf_counter()
                _decode(llm, [tok], len(prompt) + i)
                elapsed += time.perf_counter() - t0
            out.append(n / elapsed)
        return out

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
        result[f"tg{n_gen}"] = generated(n_gen) if tg_text else speeds(n_gen, one_at_a_time=True)
    stats = llm.powerinfer_stats() if hasattr(llm, "powerinfer_stats") else None
    llm.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"results": result, "peak_rss_bytes": peak, "stats": stats}


def default_modes(model: str) -> tuple[str, ...]:
    from .llama import check_model_file
    return ("stock", "dense", "sparse") if check_model_file(model) is not None else ("stock", "ram", "disk")


def run(model: str, modes: Sequence[str] | None = None, threads: int | None = None, n_prompt: int = 512,
        n_gen: int = 128, reps: int = 3, seed: int = 0, source: str | None = None, tg_text: bool | None = None,
        progress: Callable[[int, str], None] | None = None) -> list[BenchRow]:
    """Benchmark each mode `reps` times, in rounds (one process per mode and round);
    `progress(i, mode)` is called as run i of reps * len(modes) starts. For a PowerInfer model,
    `stock` runs `source` (the GGUF it was converted from)."""
    from .llama import check_model_file

    threads = threads or max(1, os.cpu_count() or 1)
    is_powerinfer = check_model_file(model) is not None
    modes = tuple(modes) if modes is not None else default_modes(model)
    tg_text = is_powerinfer if tg_text is None else tg_text
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if is_powerinfer and mode in ("ram", "disk"):
            raise ValueError(f"mode {mode!r} is for GGUF models; a PowerInfer model runs as dense or sparse")
        if not is_powerinfer and mode in ("dense", "sparse"):
            raise ValueError(f"mode {mode!r} needs a PowerInfer model (powerinfer convert)")
    if is_powerinfer and "stock" in modes and source is None:
        raise ValueError("stock llama.cpp cannot open a PowerInfer model: pass the source GGUF (--source)")
    speeds: dict[str, dict[str, list[float]]] = {mode: {} for mode in modes}
    peak: dict[str, int] = {}
    stats: dict[str, dict[str, Any]] = {}
    for rep in range(reps):
        for k, mode in enumerate(modes):
            if progress is not None:
                progress(rep * len(modes) + k, mode)
            path = source if (mode == "stock" and is_powerinfer) else model
            # every mode of a round decodes the same tokens; each round other ones
            cmd = [sys.executable, "-m", "powerinfer.bench", "--worker", mode, str(path), str(threads),
                   str(n_prompt), str(n_gen), "1", str(seed + rep), "1" if tg_text else "0"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark of {mode} failed:\n{proc.stderr[-4000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            for test, got in out["results"].items():
                speeds[mode].setdefault(test, []).extend(got)
            peak[mode] = max(peak.get(mode, 0), out["peak_rss_bytes"])
            if out.get("stats") is not None:
                stats[mode] = out["stats"]  # the last round's: rounds differ only in their random tokens
    return [BenchRow(mode, test, got, peak[mode], stats.get(mode))
            for mode in modes for test, got in speeds[mode].items()]


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
    # a round's modes ran minutes apart at most: the spread of their ratios shows how far the
    # machine's slow spells moved the result
    stock = {r.test: r.tokens_per_second for r in rows if r.mode == "stock"}
    rounds = [r for r in rows if r.mode != "stock" and len(stock.get(r.test, [])) == len(r.tokens_per_second) > 1]
    for i, r in enumerate(rounds):
        ratios = ", ".join(f"{a / b:.2f}x" for a, b in zip(r.tokens_per_second, stock[r.test]))
        blank = "" if i else "\n"  # one paragraph
        lines.append(f"{blank}{MODE_LABELS[r.mode]} {r.test} vs stock, round by round: {ratios}")
    for r in rows:
        st = r.stats or {}
        if st.get("neurons_total") and r.test.startswith("tg"):
            lines.append(f"\n{MODE_LABELS[r.mode]}: sparse decode computed the gate rows of "
                         f"{st['neurons_predicted'] / st['neurons_total']:.1%} of the FFN neurons (predicted), "
                         f"up/down rows of {st['neurons_active'] / st['neurons_total']:.1%} (fired)")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _mode, _model, _threads, _np, _ng, _reps, _seed, _tg_text = sys.argv[2:10]
    print(json.dumps(_worker(_mode, _model, int(_threads), int(_np), int(_ng), int(_reps), int(_seed),
                             _tg_text == "1")))
