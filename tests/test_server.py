"""powerinfer serve: a live server on loopback, driven by the openai client.

The synthetic model is served twice: as its GGUF (FFN on disk) and as the PowerInfer file
`powerinfer convert` makes of it.
Every answer is compared with powerinfer.Llama called directly on the same file.
"""
from __future__ import annotations

import functools
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import llama_cpp
import openai
import pytest

import powerinfer
from conftest import THREADS
from powerinfer.metrics import Metrics
from powerinfer.server import CancelToken, ModelWorker, _bias_processor, _Skipped, _stop_when_cancelled
from powerinfer.testmodels import write_test_model

N_CTX = 2048
# The server keeps llama-cpp-python's server defaults, whose repeat_penalty (1.1) is not the
# Llama methods' (1.0): reference calls pass it.
SERVER_DEFAULTS = {"repeat_penalty": 1.1}
PROMPTS = ["The weather today", "Once upon a time", "In the beginning", "Sparse neurons fire",
           "A quick brown fox", "Seven bridges of", "Large language models", "Flash storage is"]


@dataclass
class Server:
    url: str
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=600)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([^#\s][^\s]*) (\S+)$", text, re.M)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log: Path, *args: str) -> Server:
    """`powerinfer serve` in a subprocess; returns when /health answers; fails on an early exit."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "powerinfer", "serve", str(model), "--port", str(port),
                                 "-t", str(THREADS), "--quiet", *args], stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", model.name, proc, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).json() == {"status": "ok"}:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_server(server)
    pytest.fail("server did not come up:\n" + log.read_text())


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("serve")
    gguf = write_test_model(out / "tiny-q8_0.gguf", preset="tiny", wtype="q8_0")
    converted = out / "tiny-q8_0-powerinfer.gguf"
    proc = subprocess.run([sys.executable, "-m", "powerinfer", "convert", str(gguf), str(converted),
                           "--tokens", "512", "--samples", "512", "-t", str(THREADS), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {"gguf": gguf, "converted": converted}


@pytest.fixture(scope="module", params=["gguf", "converted"])
def served(request: pytest.FixtureRequest, model_files: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, powerinfer.Llama]]:
    """A server, and the same model opened directly for reference answers. The plain GGUF keeps
    its FFN on disk (so bytes are read from flash); the converted model holds its neuron bundles
    in RAM (its on-disk mode arrives with the neuron cache). The synthetic model carries a chat
    template in its GGUF."""
    path = model_files[request.param]
    on_disk = request.param == "gguf"
    server = start_server(path, tmp_path_factory.mktemp("log") / "server.log", "-c", str(N_CTX),
                          *(["--ffn-on-disk"] if on_disk else []))
    try:
        reference = powerinfer.Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, ffn_on_disk=on_disk, verbose=False)
        yield server, reference
        reference.close()
    finally:
        stop_server(server)


def _expected(reference: powerinfer.Llama, prompt: str, max_tokens: int, stream: bool = False) -> str:
    """What llama-cpp-python answers. Streamed text can differ from the whole answer when the model
    emits invalid UTF-8 (stray byte tokens): the two paths drop different bytes."""
    if stream:
        chunks = reference(prompt, max_tokens=max_tokens, temperature=0.0, stream=True, **SERVER_DEFAULTS)
        return "".join(c["choices"][0]["text"] for c in chunks)
    return reference(prompt, max_tokens=max_tokens, temperature=0.0, **SERVER_DEFAULTS)["choices"][0]["text"]


def test_models_and_health(served: tuple[Server, powerinfer.Llama]) -> None:
    server, _ = served
    assert [m.id for m in server.client.models.list().data] == [server.name]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_and_stream(served: tuple[Server, powerinfer.Llama]) -> None:
    server, reference = served
    expected = _expected(reference, PROMPTS[0], 24)
    out = server.client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert out.choices[0].text == expected
    assert out.model == server.name and 0 < out.usage.completion_tokens <= 24
    stream = server.client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=24,
                                              temperature=0, stream=True)
    chunks = [c.choices[0].text for c in stream]
    assert len(chunks) > 2 and "".join(chunks) == expected


def test_chat_completion_and_stream(served: tuple[Server, powerinfer.Llama]) -> None:
    server, reference = served
    assert reference.chat_format == "chat_template.default"  # the GGUF's own template
    messages = [{"role": "user", "content": "hello"}]
    expected = reference.create_chat_completion(messages, max_tokens=16, temperature=0.0, **SERVER_DEFAULTS)
    out = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == expected["choices"][0]["message"]["content"]
    stream = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=16,
                                                   temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == expected["choices"][0]["message"]["content"]


def test_json_mode(served: tuple[Server, powerinfer.Llama]) -> None:
    """response_format with a schema: the grammar makes even a gibberish model answer valid JSON."""
    server, reference = served
    # an enum, not "maximum": 9, which llama-cpp-python's schema converter ignores; unbounded, a
    # model that keeps picking digits runs into max_tokens before the closing brace
    digit = {"type": "integer", "enum": list(range(10))}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": digit},
              "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_object", "schema": schema}
    messages = [{"role": "user", "content": "hi"}]
    want = reference.create_chat_completion(messages, max_tokens=32, temperature=0.0, response_format=fmt,
                                            **SERVER_DEFAULTS)["choices"][0]["message"]["content"]
    out = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=32, temperature=0,
                                                response_format=fmt)
    assert out.choices[0].message.content == want
    assert set(json.loads(want)) == {"ok", "n"}


def test_logit_bias_with_min_tokens(served: tuple[Server, powerinfer.Llama]) -> None:
    """Both apply (llama-cpp-python alone drops both when given the two)."""
    server, reference = served
    token = reference.tokenize(b"q", add_bos=False)[-1]
    out = server.client.completions.create(model=server.name, prompt="hi", max_tokens=6, temperature=0,
                                           logit_bias={str(token): 100}, extra_body={"min_tokens": 6})
    assert out.usage.completion_tokens == 6
    assert out.choices[0].text == reference.detokenize([token] * 6, prev_tokens=[token]).decode()


def test_eight_concurrent_clients(served: tuple[Server, powerinfer.Llama]) -> None:
    """Eight clients at once, half of them streaming: all answered, each with its own text."""
    server, reference = served
    expected = [_expected(reference, p, 32, stream=bool(i % 2)) for i, p in enumerate(PROMPTS)]
    queued_before = server.metrics()["powerinfer_requests_queued_total"]
    got: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def client(i: int) -> None:
        try:
            c = server.client
            barrier.wait()
            if i % 2:
                stream = c.completions.create(model=server.name, prompt=PROMPTS[i], max_tokens=32, temperature=0,
                                              stream=True)
                got[i] = "".join(chunk.choices[0].text for chunk in stream)
            else:
                out = c.completions.create(model=server.name, prompt=PROMPTS[i], max_tokens=32, temperature=0)
                got[i] = out.choices[0].text
        except BaseException as exc:  # reported below, with the others' results
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [got.get(i) for i in range(len(PROMPTS))] == expected
    # they really were served one after the other: some arrived while the model was busy
    assert server.metrics()["powerinfer_requests_queued_total"] > queued_before


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_client_disconnecting_mid_stream(served: tuple[Server, powerinfer.Llama], endpoint: str) -> None:
    """A client that leaves after the first chunk: its generation stops, the next request is
    answered correctly."""
    server, reference = served
    before = server.metrics()["powerinfer_generated_tokens_total"]
    body = {"model": server.name, "max_tokens": N_CTX - 64, "temperature": 0, "stream": True,
            **({"prompt": PROMPTS[1]} if endpoint == "completions" else
               {"messages": [{"role": "user", "content": PROMPTS[1]}]})}
    with httpx.stream("POST", f"{server.url}/v1/{endpoint}", json=body, timeout=60) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ") and "choices" in json.loads(first[6:])
    expected = _expected(reference, PROMPTS[2], 16)
    out = server.client.completions.create(model=server.name, prompt=PROMPTS[2], max_tokens=16, temperature=0)
    assert out.choices[0].text == expected
    generated = server.metrics()["powerinfer_generated_tokens_total"] - before
    assert generated < (N_CTX - 64) // 2, "the abandoned stream kept generating"


def test_malformed_json_is_a_400(served: tuple[Server, powerinfer.Llama]) -> None:
    server, _ = served
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": server.name, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_unknown_model_is_a_404(served: tuple[Server, powerinfer.Llama]) -> None:
    server, _ = served
    with pytest.raises(openai.NotFoundError) as info:
        server.client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert info.value.code == "model_not_found" and "gpt-4" in info.value.message
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_too_long_a_prompt_is_a_400(served: tuple[Server, powerinfer.Llama]) -> None:
    server, _ = served
    prompt = "hello " * N_CTX
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            server.client.completions.create(model=server.name, prompt=prompt, max_tokens=4, stream=stream)
        assert info.value.code == "context_length_exceeded"
        assert f"maximum context length is {N_CTX} tokens" in info.value.message
    # and the server is fine afterwards
    assert server.client.completions.create(model=server.name, prompt="hi", max_tokens=2).choices[0].text is not None


def test_metrics(served: tuple[Server, powerinfer.Llama]) -> None:
    """The numbers in /metrics move with the work done."""
    server, _ = served
    before = server.metrics()
    out = server.client.completions.create(model=server.name, prompt="Metrics are", max_tokens=16, temperature=0,
                                           extra_body={"min_tokens": 16})
    after = server.metrics()
    assert out.usage.completion_tokens == 16
    key = 'powerinfer_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    # llama.cpp decodes every generated token but the last one
    assert after["powerinfer_generated_tokens_total"] - before["powerinfer_generated_tokens_total"] in (15, 16)
    assert after["powerinfer_prompt_tokens_total"] > before["powerinfer_prompt_tokens_total"]
    assert after["powerinfer_generation_tokens_per_second"] > 0
    if server.name.endswith("powerinfer.gguf"):
        assert after["powerinfer_ffn_on_disk"] == 0
    else:
        assert after["powerinfer_flash_bytes_read_total"] > before["powerinfer_flash_bytes_read_total"]
        assert after["powerinfer_ffn_on_disk"] == 1
    assert 10 * 2**20 < after["process_resident_memory_bytes"] < 4 * 2**30
    assert after["powerinfer_requests_waiting"] == 0



def _samples(text: str) -> dict[str, float]:
    """Samples of an exposition text, checking that each belongs to a declared metric."""
    declared: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.split("{")[0] in declared, line
            samples[name] = float(value)
    return samples


def test_metrics_exposition() -> None:
    m = Metrics()
    m.count_request("/v1/completions", 200)
    m.count_request("/v1/completions", 200)
    m.count_request("/v1/completions", 400)
    m.add_eval(prompt_tokens=10, prompt_seconds=0.5, generated_tokens=20, generation_seconds=2.0)
    text = m.render({"ffn_bytes_read": 4096, "ffn_on_disk": True, "a_new_counter": 3})
    assert text.endswith("\n")
    s = _samples(text)
    assert s['powerinfer_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert s['powerinfer_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert s["powerinfer_prompt_tokens_per_second"] == 20.0
    assert s["powerinfer_generation_tokens_per_second"] == 10.0
    assert s["powerinfer_flash_bytes_read_total"] == 4096 and s["powerinfer_ffn_on_disk"] == 1
    assert s["powerinfer_backend_a_new_counter"] == 3  # keys added to powerinfer_stats() later show up
    # no neuron cache yet: no hit rate, rather than a made-up zero
    assert not any("cache" in name for name in s)
    assert _samples(m.render({"cache_hits": 3, "cache_misses": 1}))["powerinfer_neuron_cache_hit_ratio"] == 0.75
    assert _samples(m.render({"cache_hit_rate": 0.5}))["powerinfer_neuron_cache_hit_ratio"] == 0.5


def test_no_speed_before_any_work() -> None:
    s = _samples(Metrics().render())
    assert "powerinfer_generation_tokens_per_second" not in s and s["powerinfer_generated_tokens_total"] == 0


def test_worker_runs_jobs_in_order_and_skips_cancelled_ones(tiny_model: Path) -> None:
    """The queue itself: one job at a time, arrival order, a job whose client left is not run."""
    llm = powerinfer.Llama(str(tiny_model), n_ctx=256, n_threads=THREADS, verbose=False)
    metrics = Metrics()
    worker = ModelWorker(llm, metrics)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []
    active = 0

    def job(i: int) -> int:
        nonlocal active
        active += 1
        assert active == 1  # never two at once
        if i == 0:
            started.set()
            release.wait(timeout=30)
        ran.append(i)
        active -= 1
        return i

    tokens = [CancelToken() for _ in range(5)]
    futures = [worker.submit(functools.partial(job, 0), tokens[0])]
    assert started.wait(timeout=30)
    futures += [worker.submit(functools.partial(job, i), tokens[i]) for i in range(1, 5)]
    s = _samples(metrics.render())
    assert s["powerinfer_requests_waiting"] == 4 and s["powerinfer_requests_running"] == 1
    tokens[2].cancel()  # its client disconnected while it waited
    release.set()
    assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 2] == [0, 1, 3, 4]
    with pytest.raises(_Skipped):
        futures[2].result()
    assert ran == [0, 1, 3, 4]
    assert _samples(metrics.render())["powerinfer_requests_queued_total"] == 4
    worker.close()
    llm.close()


def test_a_cancelled_call_ends_at_the_next_token(tiny_model: Path) -> None:
    """Cancellation does not wait for llama-cpp-python to yield a chunk (it holds chunks back
    while the text is not valid UTF-8): completions stop on a stopping criterion, chats on a
    forced end-of-sequence."""
    llm = powerinfer.Llama(str(tiny_model), n_ctx=256, n_threads=THREADS, verbose=False)
    messages = [{"role": "user", "content": "hello"}]
    def run(chat: bool, token: CancelToken | None) -> tuple[int, str]:
        no_eos = llama_cpp.LogitsProcessorList([_bias_processor({llm.token_eos(): -100.0})])
        kwargs: dict = {"max_tokens": 32, "temperature": 0.0, "logits_processor": no_eos}
        if token is not None:
            _stop_when_cancelled(kwargs, token, llm, chat=chat)
        out = (llm.create_chat_completion(messages, **kwargs) if chat else llm.create_completion("hello", **kwargs))
        return out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]

    for chat in (False, True):
        # llama-cpp-python goes past max_tokens to finish a UTF-8 character begun by a byte token
        used, finish = run(chat, None)
        assert finish == "length" and 32 <= used <= 35
        for cancelled in (False, True):
            token = CancelToken()
            if cancelled:
                token.cancel()
            assert run(chat, token) == ((0, "stop") if cancelled else (used, "length"))
    llm.close()
