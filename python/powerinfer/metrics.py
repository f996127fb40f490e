"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Every number comes from a measurement: llama.cpp's own performance counters for token
throughput, ``Llama.powerinfer_stats()`` for the backend (bytes read from flash, FFN time), the
kernel for process memory. A metric whose source does not exist yet (the neuron cache) is left
out rather than reported as zero.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# powerinfer_stats() keys with a well-defined meaning: (metric name, type, help).
_BACKEND_METRICS: dict[str, tuple[str, str, str]] = {
    "ffn_bytes_read": ("powerinfer_flash_bytes_read_total", "counter",
                       "Bytes of FFN weights read from the model file (flash) since the model was loaded."),
    "ffn_read_seconds": ("powerinfer_flash_read_seconds_total", "counter",
                         "Seconds spent reading FFN weights from the model file."),
    "ffn_seconds": ("powerinfer_ffn_seconds_total", "counter",
                    "Seconds spent computing FFN layers on the PowerInfer backend (reads included)."),
    "ffn_tokens": ("powerinfer_ffn_tokens_total", "counter",
                   "Tokens that went through the FFN layers on the PowerInfer backend, summed over layer passes."),
    "ffn_rows_computed": ("powerinfer_ffn_rows_computed_total", "counter",
                          "FFN weight rows multiplied on the PowerInfer backend."),
    "ffn_matmuls": ("powerinfer_ffn_matmuls_total", "counter", "FFN matrix multiplications run."),
    "ffn_graphs": ("powerinfer_ffn_layer_passes_total", "counter", "FFN layer passes (one per layer per batch)."),
    "ffn_weight_bytes": ("powerinfer_ffn_weight_bytes", "gauge", "Bytes of FFN weights in the model."),
    "ffn_resident_bytes": ("powerinfer_ffn_resident_bytes", "gauge",
                           "Bytes of FFN weights held in memory by the backend."),
    "ffn_on_disk": ("powerinfer_ffn_on_disk", "gauge", "1 if FFN weights are read from the model file when used."),
    "direct_io": ("powerinfer_direct_io", "gauge", "1 if FFN reads bypass the page cache (O_DIRECT)."),
    "sparse_layer_tokens": ("powerinfer_sparse_layer_tokens_total", "counter",
                            "FFN layer passes of single tokens computed sparse (predictor-gated)."),
    "neurons_total": ("powerinfer_sparse_neurons_total", "counter",
                      "FFN neurons of the layer passes computed sparse."),
    "neurons_predicted": ("powerinfer_sparse_neurons_predicted_total", "counter",
                          "Of those, the neurons whose gate row was computed (predicted candidates)."),
    "neurons_active": ("powerinfer_sparse_neurons_fired_total", "counter",
                       "Of those, the neurons that fired (their up and down rows were computed)."),
    "batch_repacks": ("powerinfer_batch_repacks_total", "counter",
                      "Gate/up matrices repacked into interleaved blocks for a prompt batch."),
    "down_transposes": ("powerinfer_down_transposes_total", "counter",
                        "Down projections transposed back to ffn_down's layout for a prompt batch."),
}

# Keys the neuron cache is expected to add. Until powerinfer_stats() has them, no hit-rate
# metric is exported at all.
_CACHE_HIT_RATE_KEY = "cache_hit_rate"
_CACHE_COUNT_KEYS = ("cache_hits", "cache_misses")


@dataclass
class _Eval:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0


class Metrics:
    """Counters of a serving process. Thread-safe: the model worker and the event loop update it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._total = _Eval()
        self._last_prompt_tps: Optional[float] = None
        self._last_generation_tps: Optional[float] = None
        self.waiting = 0
        self.running = 0
        self.queued = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1

    def add_eval(self, prompt_tokens: int, prompt_seconds: float,
                 generated_tokens: int, generation_seconds: float) -> None:
        """One model call's evaluation, as llama.cpp measured it."""
        with self._lock:
            t = self._total
            t.prompt_tokens += prompt_tokens
            t.prompt_seconds += prompt_seconds
            t.generated_tokens += generated_tokens
            t.generation_seconds += generation_seconds
            if prompt_tokens > 0 and prompt_seconds > 0:
                self._last_prompt_tps = prompt_tokens / prompt_seconds
            if generated_tokens > 0 and generation_seconds > 0:
                self._last_generation_tps = generated_tokens / generation_seconds

    def set_queue(self, waiting: int, running: int) -> None:
        with self._lock:
            self.waiting, self.running = waiting, running

    def count_queued(self) -> None:
        """A request arrived while the model was busy and had to wait its turn."""
        with self._lock:
            self.queued += 1

    def render(self, backend_stats: Optional[Mapping[str, Any]] = None) -> str:
        """The exposition text; `backend_stats` is ``Llama.powerinfer_stats()`` if the model has it."""
        out = _Writer()
        with self._lock:
            out.metric("powerinfer_requests_total", "counter",
                       "HTTP requests answered, by endpoint and status code.",
                       [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self._requests.items())])
            out.metric("powerinfer_requests_waiting", "gauge",
                       "Requests queued for the model (one request runs at a time).", [({}, self.waiting)])
            out.metric("powerinfer_requests_running", "gauge", "Requests the model is working on.",
                       [({}, self.running)])
            out.metric("powerinfer_requests_queued_total", "counter",
                       "Model requests that arrived while another was running or waiting, and waited their turn.",
                       [({}, self.queued)])
            t = self._total
            out.metric("powerinfer_prompt_tokens_total", "counter",
                       "Prompt tokens evaluated (a prefix cached from the previous request is not re-evaluated).",
                       [({}, t.prompt_tokens)])
            out.metric("powerinfer_prompt_seconds_total", "counter", "Seconds spent evaluating prompts.",
                       [({}, t.prompt_seconds)])
            out.metric("powerinfer_generated_tokens_total", "counter", "Tokens generated (decoded one at a time).",
                       [({}, t.generated_tokens)])
            out.metric("powerinfer_generation_seconds_total", "counter", "Seconds spent generating tokens.",
                       [({}, t.generation_seconds)])
            if self._last_prompt_tps is not None:
                out.metric("powerinfer_prompt_tokens_per_second", "gauge",
                           "Prompt evaluation speed of the last request that evaluated a prompt.",
                           [({}, self._last_prompt_tps)])
            if self._last_generation_tps is not None:
                out.metric("powerinfer_generation_tokens_per_second", "gauge",
                           "Generation speed of the last request that generated tokens.",
                           [({}, self._last_generation_tps)])
        if backend_stats is not None:
            _render_backend(out, backend_stats)
        rss = resident_memory_bytes()
        if rss is not None:
            out.metric("process_resident_memory_bytes", "gauge", "Resident memory of the serving process in bytes.",
                       [({}, rss)])
        return out.text()


def _render_backend(out: "_Writer", stats: Mapping[str, Any]) -> None:
    for key, value in stats.items():
        if not isinstance(value, (int, float)):
            continue
        if key in _BACKEND_METRICS:
            name, kind, help_text = _BACKEND_METRICS[key]
        else:
            # A counter the backend added after this table was written: exported as it is.
            name, kind, help_text = f"powerinfer_backend_{key}", "untyped", f"powerinfer_stats()['{key}']."
        out.metric(name, kind, help_text, [({}, value)])
    rate: Optional[float] = None
    if isinstance(stats.get(_CACHE_HIT_RATE_KEY), (int, float)):
        rate = float(stats[_CACHE_HIT_RATE_KEY])
    elif all(isinstance(stats.get(k), (int, float)) for k in _CACHE_COUNT_KEYS):
        hits, misses = (stats[k] for k in _CACHE_COUNT_KEYS)
        rate = hits / (hits + misses) if hits + misses else None
    if rate is not None:
        out.metric("powerinfer_neuron_cache_hit_ratio", "gauge",
                   "Fraction of FFN neuron lookups served from the in-memory neuron cache.", [({}, rate)])


def resident_memory_bytes() -> Optional[int]:
    """Current resident set size of this process (Linux), None where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text
                               else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
