"""An OpenAI-compatible HTTP API over one model: /v1/models, /v1/completions and
/v1/chat/completions, streamed as server-sent events when asked (`lmforge serve`).

Built on FastAPI (pydantic validates every request). Bad input never reaches the model and never
takes the server down: malformed JSON or a wrong field is a 400 (so is an OpenAI field that
would change the output and is not implemented here: logit_bias, echo, logprobs, penalties,
best_of, suffix, tools, response_format), an unknown model a 404, a body
over `max_request_bytes` a 413, a prompt that leaves no room in the context a 400, more requests
than `max_concurrency` generating plus `max_queue` waiting a 503, and a generation that fails a
500 (mid-stream: an error event). Errors use OpenAI's shape, {"error": {"message", "type",
"param", "code"}}, so its clients raise the usual exceptions.

Requests that generate at once decode as one batch (`batching.ContinuousBatcher`): a request
joins the running batch at its next step and leaves it when done or when its client hangs up,
so each step reads the weights once for all of them.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.assistant import Assistant, Reply
from lmforge.batching import ContinuousBatcher
from lmforge.data.chat import Message
from lmforge.generate import GenerateConfig
from lmforge.serve_requests import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    check_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    max_tokens: int = 512
    """Most tokens a request may ask for (and the default when it does not say)."""
    max_request_bytes: int = 1_000_000
    max_concurrency: int = 8
    """Requests generating at once, as one batch (n samples count as one request). On a
    2-core CPU, 16 requests 8 at a time made 3.5x (eager) to 5.3x (compiled) the tokens per
    second of one at a time (benchmarks/serve_throughput.py); each request then decodes at
    about half the speed it would get alone."""
    max_queue: int = 16
    """Requests waiting for a slot; beyond this, 503."""
    compile: bool = False
    """torch.compile the decode step (`generate.compile`): the server compiles every graph
    serving needs before it starts listening (4 graphs, 136 s for the reference model on a
    2-core CPU; later traffic compiled nothing more), then every token is faster."""
    prefill_chunk: int = 256
    """Prompt tokens prefilled per step while other requests decode: a long prompt then delays
    their next token by one chunk's forward pass, not by its whole prefill."""
    max_samples: int = 8
    """Most completions one request may ask for (`n`); the prompt is prefilled once and its n
    samples join the batch as n rows."""


class Slots:
    """At most `concurrency` holders; at most `queue` more waiting, the rest refused. Waiting
    holds no thread: a sync wait held one of the thread pool's 40, and 40 waiters left no
    thread for the streams that would free their slots. Lives on the event loop."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency, self.queue, self.waiting = concurrency, queue, 0
        self._run: anyio.Semaphore | None = None
        self._threads: anyio.CapacityLimiter | None = None

    @property
    def threads(self) -> anyio.CapacityLimiter:
        """Worker threads that wait for the batcher: one per holder, so holders never wait for
        one another's threads."""
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(self.concurrency)
        return self._threads

    async def acquire(self) -> None:
        if self._run is None:  # made on the event loop, at first use
            self._run = anyio.Semaphore(self.concurrency)
        try:
            self._run.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        if self.waiting >= self.queue:
            raise APIError(503, "server busy: too many requests waiting", "server_busy")
        self.waiting += 1
        try:
            await self._run.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        assert self._run is not None
        self._run.release()


class Held:
    """One acquired slot, released once: by the response's end, or when a stream the client
    never read is garbage-collected (its generator's `finally` would never run)."""

    def __init__(self, slots: Slots) -> None:
        self.slots: Slots | None = slots

    @classmethod
    async def take(cls, slots: Slots) -> Held:
        await slots.acquire()  # may refuse (503): then there is nothing to release
        return cls(slots)

    def release(self) -> None:
        if self.slots is not None:
            self.slots.release()
            self.slots = None

    def __del__(self) -> None:
        self.release()


def create_app(assistant: Assistant, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    batcher = ContinuousBatcher(assistant.model, cfg.compile, cfg.prefill_chunk)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(batcher.warm_up)  # compiles, if asked, before serving
        yield
        batcher.close()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher  # its counters (steps, widest) show how requests were batched
    slots = Slots(cfg.max_concurrency, cfg.max_queue)
    created = int(time.time())

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        too_large = f"request body over {cfg.max_request_bytes} bytes"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_request_bytes:
            return _error(413, too_large, "too_large")
        if request.method == "POST":  # chunked bodies have no content-length: count as read
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_request_bytes:
                    return _error(413, too_large, "too_large")
                chunks.append(chunk)
            request._body = b"".join(chunks)  # what request.body() caches for the endpoint
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status_code, str(e.detail), e.kind, e.param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=e)
        return _error(500, f"internal error: {type(e).__name__}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            message, where = "request body is not valid JSON", ""
        return _error(400, f"{where}: {message}" if where else message, "invalid_request_error")

    card = {"id": assistant.name, "object": "model", "created": created, "owned_by": "lmforge"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> dict[str, Any]:
        _check_model(name, assistant)
        return card

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, http: Request) -> Any:
        _check_model(req.model, assistant)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "one prompt per request", "invalid_request_error", "prompt")
        check_text(prompts[0], "prompt")
        prompt = await anyio.to_thread.run_sync(assistant.text_prompt, prompts[0])
        return await _respond(req, prompt, "text_completion", assistant, batcher, cfg, slots, http)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, http: Request) -> Any:
        _check_model(req.model, assistant)
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        messages = [Message(m.role, m.text) for m in req.messages]
        for m in messages:
            check_text(m.content, "messages")
        if any(m.role == "system" for m in messages[1:]):
            raise APIError(400, "a system message may only come first", "invalid_request_error")
        prompt = await anyio.to_thread.run_sync(assistant.chat_prompt, messages)
        return await _respond(req, prompt, "chat.completion", assistant, batcher, cfg, slots, http)

    return app


async def _respond(
    req: SamplingRequest,
    prompt: list[int],
    kind: str,
    assistant: Assistant,
    batcher: ContinuousBatcher,
    cfg: ServeConfig,
    slots: Slots,
    http: Request,
) -> Any:
    max_tokens = req.max_tokens or cfg.max_tokens
    if max_tokens > cfg.max_tokens:
        raise APIError(
            400,
            f"max_tokens {max_tokens} > this server's {cfg.max_tokens}",
            "invalid_request_error",
        )
    if req.n > cfg.max_samples:
        raise APIError(
            400, f"n {req.n} > this server's {cfg.max_samples}", "invalid_request_error", "n"
        )
    if req.n > 1 and req.stream:
        raise APIError(
            400, "n > 1 is not streamed; ask without stream", "invalid_request_error", "n"
        )
    room = assistant.context_len - len(prompt)
    if room < 1:
        raise APIError(
            400,
            f"prompt of {len(prompt)} tokens leaves no room in the {assistant.context_len}-token "
            "context",
            "context_length_exceeded",
            "messages" if kind == "chat.completion" else "prompt",
        )
    gen = GenerateConfig(
        max_new_tokens=min(max_tokens, room),
        temperature=req.temperature,
        top_k=None,
        top_p=req.top_p,
        seed=req.seed if req.seed is not None else secrets.randbits(63),
        compile=cfg.compile,
    )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    reply = Reply(prompt_tokens=len(prompt))
    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    held = await Held.take(slots)
    try:
        request = batcher.submit(prompt, gen, req.n, assistant.stop_ids, assistant.stop_check(stop))
    except BaseException:
        held.release()
        raise
    if not req.stream:
        try:
            choices = await _unless_client_leaves(
                http, slots.threads, lambda: assistant.replies(request.samples(), len(prompt), stop)
            )
        except Exception as e:  # generation failed: the log gets the traceback, the client
            log.exception("request %s failed", rid)  # OpenAI's error shape
            return _error(500, _failure(e), "server_error")
        finally:
            request.cancel()
            held.release()
        if choices is None:  # nobody to answer; 499 is what proxies log for it
            return Response(status_code=499)
        return _body(kind, rid, req.model, choices, final=True)

    async def events() -> AsyncIterator[str]:
        pieces = assistant.pieces(request.tokens(), reply, stop)
        try:
            if kind == "chat.completion":  # the first chunk names the role
                yield _sse(_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
            while (piece := await _next_in_thread(pieces, slots.threads)) is not None:
                if kind == "chat.completion":
                    yield _sse(_chunk(rid, req.model, {"content": piece}, None))
                else:
                    yield _sse(_body(kind, rid, req.model, [(piece, reply)], final=False))
            if kind == "chat.completion":
                yield _sse(_chunk(rid, req.model, {}, reply.finish_reason))
            else:
                last = _body(kind, rid, req.model, [("", reply)], final=True, usage=False)
                yield _sse(last)
            if req.stream_options is not None and req.stream_options.include_usage:
                chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
                usage = {"choices": [], "usage": _usage([reply])}
                created = int(time.time())
                head = {"id": rid, "object": chunk_kind, "created": created, "model": req.model}
                yield _sse({**head, **usage})
            yield "data: [DONE]\n\n"
        except Exception as e:  # generation failed mid-stream: an error event, as OpenAI sends
            log.exception("request %s failed", rid)
            yield _sse({"error": _error_body(_failure(e), "server_error")})
        finally:
            request.cancel()
            held.release()

    return StreamingResponse(events(), media_type="text/event-stream")


async def _next_in_thread(items: Iterator[str], threads: anyio.CapacityLimiter) -> str | None:
    """next(items) on a worker thread (it waits for the batcher), None at the end. When the
    client goes away the server cancels this await; the thread is left to finish on its own
    and the stream's `finally` takes the request out of the batch at once."""
    return await anyio.to_thread.run_sync(
        next, items, None, abandon_on_cancel=True, limiter=threads
    )


async def _unless_client_leaves(
    http: Request, threads: anyio.CapacityLimiter, work: Callable[[], Any]
) -> Any:
    """work() on a worker thread; None as soon as the client hangs up, leaving the thread to
    finish on its own once the caller cancels the request. The hang-up is awaited, not polled:
    behind a BaseHTTPMiddleware `Request.is_disconnected` never sees it."""
    outcome: list[Any] = []

    async def run() -> None:
        try:
            waited = anyio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=threads)
            outcome.append(await waited)
        except Exception as e:
            outcome.append(e)
        done.cancel()

    async with anyio.create_task_group() as done_group:
        done = done_group.cancel_scope
        done_group.start_soon(run)
        while (await http.receive())["type"] != "http.disconnect":  # the body is read already
            pass
        done.cancel()
    if not outcome:
        return None
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _body(
    kind: str,
    rid: str,
    model: str,
    choices: list[tuple[str, Reply]],
    final: bool,
    usage: bool | None = None,
) -> dict[str, Any]:
    """A response (or, not final, a stream chunk) with one choice per (text, reply); with usage
    when final unless told otherwise (a stream's last chunk has none: include_usage adds a
    chunk of its own)."""
    listed = []
    for index, (text, reply) in enumerate(choices):
        finish = reply.finish_reason if final else None
        if kind == "chat.completion":
            message = {"role": "assistant", "content": text}
            listed.append({"index": index, "message": message, "finish_reason": finish})
        else:
            listed.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
    body: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": listed,
    }
    if final if usage is None else usage:
        body["usage"] = _usage([reply for _, reply in choices])
    return body


def _usage(replies: list[Reply]) -> dict[str, int]:
    """Token counts of the replies to one prompt."""
    prompt_tokens = replies[0].prompt_tokens
    completion_tokens = sum(reply.completion_tokens for reply in replies)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chunk(rid: str, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _check_model(name: str, assistant: Assistant) -> None:
    if name != assistant.name:
        raise APIError(
            404, f"model {name!r} not found; this server has {assistant.name!r}", "model_not_found"
        )


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": _error_body(message, kind, param)}, status_code=status)


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's shape: `type` is the broad class, `code` the particular error."""
    broad = "server_error" if kind in ("server_error", "server_busy") else "invalid_request_error"
    return {"message": message, "type": broad, "param": param, "code": kind}


def _failure(e: BaseException) -> str:
    """What a client is told when generation failed: the first cause, not a traceback."""
    cause = e.__cause__ or e
    return f"generation failed: {type(cause).__name__}: {cause}"


def serve(assistant: Assistant, host: str, port: int, cfg: ServeConfig | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(assistant, cfg), host=host, port=port, log_level="info")
