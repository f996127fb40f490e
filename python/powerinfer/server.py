"""An OpenAI-compatible HTTP server for one model (``powerinfer serve``).

Endpoints: ``/v1/completions`` and ``/v1/chat/completions`` (both with SSE streaming),
``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text).

Requests are validated with llama-cpp-python's own request models, so every sampling parameter
its server accepts is accepted here with the same meaning. The rest is ours, because the model
is used differently: every call runs in one worker thread, in arrival order (a ``Llama`` serves
one request at a time; the others wait, and none is interrupted by a newcomer); a client that
goes away stops its generation at the next token; errors are OpenAI-style JSON bodies with 4xx
codes for the client's mistakes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

import jinja2
import llama_cpp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics

# How often a waiting request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.25
_CONTEXT_ERROR = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Skipped(Exception):
    """The job was cancelled before its turn came."""


class CancelToken:
    """Set when the client of a request is gone; the worker checks it between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


_END = object()  # end of a token stream


class ModelWorker:
    """Runs every call on the model in one thread, first come first served.

    ``llama_cpp.Llama`` keeps one KV cache and sampler: two requests must never interleave.
    A single-thread executor gives both the mutual exclusion and a FIFO queue.
    """

    def __init__(self, llm: llama_cpp.Llama, metrics: Metrics) -> None:
        self.llm = llm
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="powerinfer-model")
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._tokens: set[CancelToken] = set()

    def submit(self, fn: Callable[[], Any], token: CancelToken) -> "Future[Any]":
        with self._lock:
            if self._waiting + self._running > 0:
                self._metrics.count_queued()
            self._waiting += 1
            self._tokens.add(token)
            self._publish()
        return self._pool.submit(self._run, fn, token)

    def _run(self, fn: Callable[[], Any], token: CancelToken) -> Any:
        with self._lock:
            self._waiting -= 1
            self._running += 1
            self._publish()
        try:
            if token.cancelled:
                raise _Skipped()
            ctx = self.llm._ctx.ctx
            # llama.cpp's own timings, reset per call so they describe exactly this request
            llama_cpp.llama_perf_context_reset(ctx)
            try:
                return fn()
            finally:
                perf = llama_cpp.llama_perf_context(ctx)
                self._metrics.add_eval(perf.n_p_eval, perf.t_p_eval_ms / 1000, perf.n_eval, perf.t_eval_ms / 1000)
        finally:
            with self._lock:
                self._running -= 1
                self._tokens.discard(token)
                self._publish()

    def _publish(self) -> None:
        self._metrics.set_queue(self._waiting, self._running)

    def close(self) -> None:
        """Stop streams at their next token, drop queued work, wait for the current call."""
        with self._lock:
            for token in self._tokens:
                token.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _stream_job(make_iterator: Callable[[], Iterator[Any]], token: CancelToken,
                loop: asyncio.AbstractEventLoop, queue: "asyncio.Queue[Any]") -> Callable[[], None]:
    """A worker job that runs a streaming call and hands each chunk to the event loop."""

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def job() -> None:
        try:
            iterator = make_iterator()
            try:
                for chunk in iterator:
                    if token.cancelled:
                        break
                    put(chunk)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # ends llama's generator now, not when it is garbage-collected
            put(_END)
        except Exception as exc:
            put(exc)

    return job


async def _wait(request: Request, token: CancelToken, awaitable: "asyncio.Future[Any]",
                job: "Optional[asyncio.Future[Any]]" = None) -> Any:
    """The result of `awaitable`, or the exception of `job` if that fails first (a stream that
    fails or is dropped before its first chunk). Cancels `token` and raises _ClientGone if the
    client disconnects while waiting."""
    while True:
        waiting = {awaitable} if job is None else {awaitable, job}
        done, _ = await asyncio.wait(waiting, timeout=_DISCONNECT_POLL_SECONDS,
                                     return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            if future.cancelled():  # dropped from the queue: the server is stopping
                raise _Skipped()
        if awaitable in done:
            return awaitable.result()
        if job is not None and job in done and job.exception() is not None:
            job.result()  # raises
        if await request.is_disconnected():
            token.cancel()
            raise _ClientGone()


def _quiet(future: "asyncio.Future[Any]") -> None:
    """Retrieve `future`'s exception when it ends, whether or not someone still waits for it
    (a dropped request's job), so asyncio does not log it as never retrieved."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


def _error_from_exception(exc: BaseException, max_tokens: Optional[int]) -> OpenAIError:
    """The OpenAI-style error for an exception raised by a Llama call."""
    if isinstance(exc, OpenAIError):
        return exc
    m = _CONTEXT_ERROR.search(str(exc))
    if m:
        prompt, window = int(m.group(1)), int(m.group(2))
        return OpenAIError(400, f"This model's maximum context length is {window} tokens, however you "
                                f"requested {prompt} tokens in the prompt ({max_tokens or 0} more for the "
                                "completion). Please reduce the length of the prompt.",
                           param="messages", code="context_length_exceeded")
    if isinstance(exc, (ValueError, jinja2.TemplateError)):
        return OpenAIError(400, str(exc))
    return OpenAIError(500, f"{type(exc).__name__}: {exc}", type="server_error")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (not a
    BaseHTTPMiddleware: that one buffers streaming responses' disconnects)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope.get("path", "")
            self.metrics.count_request(path if path in _ENDPOINTS else "other", status)


def create_app(llm: llama_cpp.Llama, model_name: str, *, model_path: Optional[str] = None) -> FastAPI:
    """The FastAPI application serving `llm` under the id `model_name`.

    Requests may name the model by `model_name` or by `model_path`; any other name is a 404.
    The app owns the model from here on: it is closed when the app shuts down.
    """
    metrics = Metrics()
    worker = ModelWorker(llm, metrics)
    accepted_names = {model_name} | ({model_path} if model_path else set())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.close)
        llm.close()

    app = FastAPI(title="powerinfer", lifespan=lifespan)
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any("json" in str(e.get("type", "")) for e in errors):  # json_invalid (older: value_error.jsondecode)
            return OpenAIError(400, "The request body is not valid JSON.").response()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        return OpenAIError(400, f"Invalid request: {where}: {first.get('msg', 'invalid value')}",
                           param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return OpenAIError(exc.status_code, str(exc.detail), type=kind).response()

    def check_model(name: Optional[str]) -> None:
        if name is not None and name not in accepted_names:
            raise OpenAIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                              param="model", code="model_not_found")

    def call_arguments(body: Union[CreateCompletionRequest, CreateChatCompletionRequest]) -> dict[str, Any]:
        check_model(body.model)
        if (body.n or 1) != 1 or (getattr(body, "best_of", None) or 1) != 1:
            raise OpenAIError(400, "Only one choice per request is supported (n = 1, best_of = 1).", param="n")
        kwargs = body.model_dump(exclude={"model", "stream", "n", "best_of", "user", "logit_bias_type",
                                          "min_tokens", "grammar", "logit_bias"})
        kwargs["model"] = model_name
        if body.grammar is not None:
            kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)
        # logit_bias as a processor of ours: llama-cpp-python drops both its logit_bias and the
        # logits_processor list when given the two (it assigns the result of list.extend)
        processors = llama_cpp.LogitsProcessorList()
        if body.logit_bias is not None:
            processors.append(_bias_processor(_token_bias(llm, body.logit_bias) if body.logit_bias_type == "tokens"
                                              else {int(k): v for k, v in body.logit_bias.items()}))
        if body.min_tokens > 0:
            processors.append(llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llm.token_eos()))
        if processors:
            kwargs["logits_processor"] = processors
        return kwargs

    async def answer(request: Request, body: Union[CreateCompletionRequest, CreateChatCompletionRequest],
                     call: Callable[..., Any], kwargs: dict[str, Any]) -> Response:
        token = CancelToken()
        _stop_when_cancelled(kwargs, token, llm, chat=isinstance(body, CreateChatCompletionRequest))
        if not body.stream:
            future = asyncio.wrap_future(worker.submit(lambda: call(**kwargs, stream=False), token))
            _quiet(future)
            try:
                return JSONResponse(await _wait(request, token, future))
            except (_ClientGone, _Skipped):
                return Response(status_code=499)
            except Exception as exc:
                raise _error_from_exception(exc, body.max_tokens) from None

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job = _stream_job(lambda: call(**kwargs, stream=True), token, loop, queue)
        done = asyncio.wrap_future(worker.submit(job, token))
        _quiet(done)
        # Wait for the first chunk before answering 200: a prompt too long for the context
        # fails there, and gets a proper 400 instead of a broken stream.
        getter = asyncio.ensure_future(queue.get())
        try:
            first = await _wait(request, token, getter, done)
        except (_ClientGone, _Skipped):
            getter.cancel()
            return Response(status_code=499)
        if isinstance(first, BaseException):
            raise _error_from_exception(first, body.max_tokens)

        async def events() -> AsyncIterator[str]:
            item = first
            try:
                while item is not _END:
                    if isinstance(item, BaseException):
                        # Headers are sent: report the failure in the stream, as OpenAI does.
                        yield _sse(_error_from_exception(item, body.max_tokens).body())
                        return
                    yield _sse(item)
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                token.cancel()  # the client may be gone: stop generating at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request, body: CreateCompletionRequest) -> Response:
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise OpenAIError(400, "Exactly one prompt per request is supported.", param="prompt")
            body.prompt = body.prompt[0]
        return await answer(request, body, llm.create_completion, call_arguments(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: CreateChatCompletionRequest) -> Response:
        return await answer(request, body, llm.create_chat_completion, call_arguments(body))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "powerinfer"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return {"id": model_name, "object": "model", "created": int(started), "owned_by": "powerinfer"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}  # the model is loaded before the server starts listening

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        stats = llm.powerinfer_stats() if hasattr(llm, "powerinfer_stats") else None
        return Response(metrics.render(stats), media_type=METRICS_CONTENT_TYPE)

    started = time.time()
    app.state.metrics = metrics
    app.state.worker = worker
    return app


def _stop_when_cancelled(kwargs: dict[str, Any], token: CancelToken, llm: llama_cpp.Llama, *, chat: bool) -> None:
    """Make the call end at the next token once `token` is cancelled.

    Checking between stream chunks is not enough: llama-cpp-python holds chunks back while the
    text is not valid UTF-8 (and then re-decodes all held tokens for every new one), so a
    stream can go on for long without yielding. A completion takes a stopping criterion; a
    chat call has no such parameter, so its logits are replaced by a certain end-of-sequence.
    """
    if not chat:
        kwargs["stopping_criteria"] = llama_cpp.StoppingCriteriaList([lambda _ids, _logits: token.cancelled])
        return
    if kwargs.get("grammar") is not None or kwargs.get("response_format") is not None:
        return  # a grammar may forbid the end here: forcing it could leave no token to sample
    eos = llm.token_eos()

    def end_if_cancelled(_ids: Any, scores: Any) -> Any:
        if not token.cancelled:
            return scores
        forced = np.full_like(scores, -np.inf)
        forced[eos] = 0.0
        return forced

    kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([*(kwargs.get("logits_processor") or []),
                                                                end_if_cancelled])


def _bias_processor(bias: dict[int, float]) -> Callable[[Any, Any], Any]:
    """OpenAI's logit_bias: `bias[token]` added to that token's logit."""
    ids = np.array(list(bias), dtype=np.intc)
    values = np.array(list(bias.values()), dtype=np.single)

    def add_bias(_ids: Any, scores: Any) -> Any:
        out = np.array(scores, copy=True)
        out[ids] += values
        return out

    return add_bias


def _token_bias(llm: llama_cpp.Llama, bias: dict[str, float]) -> dict[int, float]:
    """logit_bias keyed by token text (``logit_bias_type: "tokens"``) to token ids."""
    out: dict[int, float] = {}
    for text, value in bias.items():
        for token in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True):
            out[token] = value
    return out


def serve(llm: llama_cpp.Llama, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          model_path: Optional[str] = None, log_level: str = "info") -> None:
    """Serve `llm` until interrupted (SIGINT / SIGTERM)."""
    import uvicorn

    app = create_app(llm, model_name, model_path=model_path)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
