"""The OpenAI-compatible server, driven by the official `openai` client over loopback:
completions, chat, streaming, concurrency limits and every kind of bad input."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from lmforge import batching
from lmforge.assistant import Assistant, Reply, chat_loop
from lmforge.data.chat import Message
from lmforge.data.tokenizer import TextTokenizer
from lmforge.generate import GenerateConfig, generate, last_logits
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.serve import ServeConfig, create_app


class SlowAssistant(Assistant):
    """Its model sleeps `delay` seconds before every forward pass, so that concurrent requests
    overlap."""

    delay = 0.0


@pytest.fixture(scope="module")
def assistant(prepared_run: Path) -> SlowAssistant:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=512, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128
    )
    tokenizer = TextTokenizer.load(prepared_run / "tokenizer.json")
    slow = SlowAssistant(Llama(cfg).eval(), tokenizer, "tiny", context_len=96)
    slow.model.lm_head.register_forward_pre_hook(lambda *_: time.sleep(slow.delay))
    return slow


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app on a loopback port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(assistant: SlowAssistant) -> Iterator[str]:
    cfg = ServeConfig(max_tokens=32, max_request_bytes=20_000, max_concurrency=1, max_queue=1)
    with serving(create_app(assistant, cfg)) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def greedy(assistant: Assistant, prompt: list[int], n: int) -> str:
    out = generate(assistant.model, prompt, GenerateConfig(temperature=0, max_new_tokens=n))
    stops = [i for i, t in enumerate(out) if t in assistant.stop_ids]
    return assistant.tokenizer.decode(out[: stops[0]] if stops else out)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好, who are you?"},
]


def test_models_chat_and_completions(client: openai.OpenAI, assistant: Assistant) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=12,  # type: ignore[arg-type]
    )
    prompt = assistant.chat_prompt([Message(m["role"], m["content"]) for m in MESSAGES])  # type: ignore[arg-type]
    assert chat.choices[0].message.content == greedy(assistant, prompt, 12)
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt)
    assert chat.choices[0].finish_reason in ("stop", "length")
    text = client.completions.create(model="tiny", prompt="The river", temperature=0, max_tokens=10)
    assert text.choices[0].text == greedy(assistant, assistant.text_prompt("The river"), 10)


def test_streaming_gives_the_same_text(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 16}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))  # type: ignore[call-overload]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    pieces = list(
        client.completions.create(
            model="tiny", prompt="A", temperature=0, max_tokens=8, stream=True
        )
    )
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_options_include_usage_adds_a_last_usage_chunk(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 16}
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(  # type: ignore[call-overload]
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == (
        whole.choices[0].message.content
    )
    plain = list(client.chat.completions.create(**kwargs, stream=True))  # type: ignore[call-overload]
    assert all(c.usage is None for c in plain)
    text = {"model": "tiny", "prompt": "A", "temperature": 0, "max_tokens": 8, "stream": True}
    completion = list(client.completions.create(**text))  # type: ignore[call-overload]
    assert all(c.usage is None for c in completion)  # the last text chunk had usage unasked
    completion = list(client.completions.create(**text, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    assert [c.usage is not None for c in completion] == [False] * (len(completion) - 1) + [True]


def test_openai_request_shapes_are_understood_or_refused(
    client: openai.OpenAI, server: str, assistant: Assistant
) -> None:
    """Text parts and nulls mean what OpenAI's API takes them to mean; a field that would
    change the output and is not implemented is a 400 naming it, never silently ignored."""
    kwargs = {"model": "tiny", "temperature": 0, "max_tokens": 6}
    plain = client.chat.completions.create(messages=MESSAGES, **kwargs)  # type: ignore[call-overload]
    parts = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES
    ]
    as_parts = client.chat.completions.create(messages=parts, **kwargs)  # type: ignore[call-overload]
    assert as_parts.choices[0].message.content == plain.choices[0].message.content
    body = {"model": "tiny", "prompt": "A", "max_tokens": 2, "temperature": None, "n": None}
    nulls = httpx.post(f"{server}/v1/completions", json={**body, "top_p": None, "stream": None})
    assert nulls.status_code == 200, nulls.text
    assert client.completions.create(model="tiny", prompt="A", max_tokens=2, user="u").choices
    for field, value in [
        ("logit_bias", {"466": -100}),
        ("echo", True),
        ("logprobs", 3),
        ("frequency_penalty", 0.5),
        ("best_of", 2),
    ]:
        r = httpx.post(f"{server}/v1/completions", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    error = missing.value.body
    assert isinstance(error, dict) and (error["type"], error["code"]) == (
        "invalid_request_error",
        "model_not_found",
    )


def test_text_that_is_not_text_is_a_400_not_a_500(server: str) -> None:
    """JSON's \\ud800 escape is valid JSON but no text: the tokenizer raised TypeError (500)."""
    chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    text = b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'
    for path, body, param in [
        ("chat/completions", chat, "messages"),
        ("completions", text, "prompt"),
    ]:
        r = httpx.post(
            f"{server}/v1/{path}", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_read(
    assistant: SlowAssistant,
) -> None:
    """Without content-length the body was read whole, then refused: 400 MiB took 800 MiB."""
    import anyio

    app = create_app(assistant, ServeConfig(max_request_bytes=20_000))
    sent: list[int] = []
    replies: list[dict] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def receive() -> dict:
        sent.append(10_000)
        return {"type": "http.request", "body": b" " * 10_000, "more_body": len(sent) < 1000}

    async def send(message: dict) -> None:
        replies.append(message)

    anyio.run(app, scope, receive, send)
    assert replies[0]["status"] == 413
    assert sum(sent) < 100_000  # 3 chunks of 10 kB, not the 10 MB on offer


def test_bad_requests_get_clear_4xx(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="leaves no room"):
        client.completions.create(model="tiny", prompt="word " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens 999"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=999)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="seed"):  # no generator takes it
        client.completions.create(model="tiny", prompt="hi", seed=2**64)
    bad = [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "tiny"}', 400, "messages"),
        (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        (b'{"model": "tiny", "messages": []}', 400, "messages"),
        (b'{"model": "tiny", "messages": "hello"}', 400, "messages"),
        (b"[1, 2]", 400, ""),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            + b"x" * 30_000
            + b'"}]}',
            413,
            "over",
        ),
    ]
    for body, status, text in bad:
        r = httpx.post(
            f"{server}/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == status, body[:60]
        assert text in r.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/models").status_code == 200  # still serving


def test_concurrency_beyond_the_queue_is_refused(
    client: openai.OpenAI, assistant: SlowAssistant
) -> None:
    assistant.delay = 0.05

    def ask(_: int) -> str:
        try:
            client.completions.create(model="tiny", prompt="hi", temperature=0, max_tokens=16)
            return "ok"
        except openai.InternalServerError as e:
            return "busy" if e.status_code == 503 else "error"

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6)))
    finally:
        assistant.delay = 0.0
    assert results.count("ok") >= 2 and results.count("busy") >= 1 and "error" not in results
    assert ask(0) == "ok"  # every slot came back


def test_chat_loop_streams_keeps_history_and_resets(assistant: SlowAssistant) -> None:
    lines = iter(["hello", "and then?", "/reset", "你好", "/exit"])
    out: list[str] = []
    cfg = GenerateConfig(temperature=0, max_new_tokens=6)
    history = chat_loop(assistant, cfg, "Be brief.", read=lambda _: next(lines), write=out.append)
    assert [m.role for m in history] == ["system", "user", "assistant"]  # after the reset
    assert history[1].content == "你好"
    text = "".join(out)
    assert text.count("assistant> ") == 3 and "(history cleared)" in text
    prompt = assistant.chat_prompt(history[:2])
    assert history[2].content == greedy(assistant, prompt, 6)


def test_chat_loop_drops_the_oldest_turns_to_fit(assistant: SlowAssistant) -> None:
    cfg = GenerateConfig(temperature=0, max_new_tokens=8)
    lines = iter(["one " * 12, "two " * 12, "three " * 12, "/exit"])
    history = chat_loop(assistant, cfg, None, read=lambda _: next(lines), write=lambda _: None)
    assert history[0].content.startswith("two") or history[0].content.startswith("three")
    assert len(assistant.chat_prompt(history)) <= assistant.context_len


def test_chat_loop_refuses_a_message_too_long_without_losing_the_history(
    assistant: SlowAssistant,
) -> None:
    cfg = GenerateConfig(temperature=0, max_new_tokens=4)
    lines = iter(["hello", "word " * (2 * assistant.context_len), "/exit"])
    out: list[str] = []
    history = chat_loop(assistant, cfg, "Be brief.", read=lambda _: next(lines), write=out.append)
    assert "message too long" in "".join(out)
    assert [(m.role, m.content) for m in history[:2]] == [
        ("system", "Be brief."),
        ("user", "hello"),
    ]
    assert len(history) == 3  # the first exchange, as it was


def test_serve_compile_reaches_the_batched_decode_step(
    assistant: SlowAssistant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lmforge serve ... generate.compile=true` compiles the decode step every request shares."""
    seen: list[bool] = []

    def decode_step(model: object, compile: bool) -> object:
        seen.append(compile)
        return last_logits

    monkeypatch.setattr(batching, "decode_step", decode_step)
    for compile in (True, False):
        create_app(assistant, ServeConfig(max_tokens=4, compile=compile))
    assert seen == [True, False]


def test_the_server_warms_its_batcher_up_before_serving(assistant: SlowAssistant) -> None:
    """Startup decodes padded rows ending one by one, equal rows and a lone request: with
    `compile`, every graph is built before the first request."""
    from starlette.testclient import TestClient

    app = create_app(assistant, ServeConfig(max_tokens=8))
    with TestClient(app) as http:
        assert app.state.batcher.widest == 3 and not app.state.batcher.busy
        steps = app.state.batcher.steps
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
        assert app.state.batcher.steps == steps + 1


def test_concurrent_requests_share_one_batch_and_get_their_own_replies(
    assistant: SlowAssistant,
) -> None:
    """Four clients at once, streamed and not, chat and completions: every reply equals the one
    the same request got alone, and the requests decoded as one batch."""
    app = create_app(assistant, ServeConfig(max_tokens=32, max_concurrency=4))
    prompts = ["The river", "你好", "a b c d e f g h i j k", "Once"]

    def ask(client: openai.OpenAI, i: int) -> str:
        if i % 2:
            stream = client.completions.create(
                model="tiny", prompt=prompts[i], temperature=0, max_tokens=12, stream=True
            )
            return "".join(chunk.choices[0].text for chunk in stream)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompts[i]}],
            temperature=0.8,
            seed=i,
            max_tokens=12,
        )
        return reply.choices[0].message.content or ""

    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        app.state.batcher.widest = 0  # forget the warm-up's batches
        alone = [ask(client, i) for i in range(4)]
        assert app.state.batcher.widest == 1
        assistant.delay = 0.02
        try:
            with ThreadPoolExecutor(4) as pool:
                together = list(pool.map(lambda i: ask(client, i), range(4)))
        finally:
            assistant.delay = 0.0
    assert together == alone
    assert app.state.batcher.widest >= 3


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello\n\nUser: hi", ["\n\nUser:"], "Hello"),
        ("Hello\n\nUsed", ["\n\nUser:"], "Hello\n\nUsed"),  # a prefix that does not finish
        ("ab!cd", ["!", "b!x"], "ab"),
        ("abcd", ["cdx", "d"], "abc"),
    ],
)
def test_no_part_of_a_stop_string_is_streamed(
    assistant: Assistant, text: str, stop: list[str], expected: str
) -> None:
    """A stop string that spans tokens: its first pieces are held back until it completes (and
    nothing of it is sent) or is ruled out (and they are)."""
    ids = [t for char in text for t in assistant.tokenizer.encode(char)]  # a token a character
    reply = Reply(prompt_tokens=0)
    pieces = list(assistant.pieces(iter(ids), reply, stop))
    assert "".join(pieces) == expected
    assert reply.finish_reason == ("stop" if expected != text else "length")


def test_n_completions_come_from_one_batch(client: openai.OpenAI, assistant: Assistant) -> None:
    """n > 1 (ignored before: extra fields are dropped) returns n choices: greedy ones equal the
    single reply, stop strings cut each as they cut one, sampled ones are Assistant.complete's."""
    kwargs = {"model": "tiny", "prompt": "The river", "temperature": 0, "max_tokens": 10}
    single = client.completions.create(**kwargs)  # type: ignore[call-overload]
    three = client.completions.create(**kwargs, n=3)  # type: ignore[call-overload]
    assert [c.text for c in three.choices] == [single.choices[0].text] * 3
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 3 * single.usage.completion_tokens
    stop = single.choices[0].text[2:4]
    cut = client.completions.create(**kwargs, stop=[stop])  # type: ignore[call-overload]
    cut2 = client.completions.create(**kwargs, stop=[stop], n=2)  # type: ignore[call-overload]
    assert [c.text for c in cut2.choices] == [cut.choices[0].text] * 2
    assert [c.finish_reason for c in cut2.choices] == [cut.choices[0].finish_reason] * 2
    assert cut2.usage.completion_tokens == 2 * cut.usage.completion_tokens

    sampled = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=1.0,
        seed=3,
        max_tokens=8,
        n=4,
    )
    prompt = assistant.chat_prompt([Message(m["role"], m["content"]) for m in MESSAGES])  # type: ignore[arg-type]
    gen = GenerateConfig(max_new_tokens=8, temperature=1.0, top_k=None, top_p=1.0, seed=3)
    expected = assistant.complete(prompt, gen, 4)
    assert [c.message.content for c in sampled.choices] == [text for text, _ in expected]
    assert [c.finish_reason for c in sampled.choices] == [r.finish_reason for _, r in expected]

    with pytest.raises(openai.BadRequestError, match="not streamed"):
        client.completions.create(model="tiny", prompt="hi", n=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="n 9 > this server's 8"):
        client.completions.create(model="tiny", prompt="hi", n=9)


def test_serve_flags_reach_the_server_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge import cli, serve

    got: dict[str, object] = {}
    monkeypatch.setattr(cli, "_assistant", lambda recipe, args: "assistant")
    monkeypatch.setattr(serve, "serve", lambda *args: got.update(zip("ahpc", args, strict=True)))
    flags = ["--port", "9", "--max-concurrency", "3", "--max-queue", "5", "--prefill-chunk", "64"]
    assert cli.main(["serve", *flags]) == 0
    assert got["p"] == 9 and got["c"] == ServeConfig(
        max_tokens=512, max_concurrency=3, max_queue=5, prefill_chunk=64
    )


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_leaves_the_batch(assistant: SlowAssistant, stream: bool) -> None:
    """Mid-stream, or while waiting for a whole reply: the request leaves the batch at once."""
    app = create_app(assistant, ServeConfig(max_tokens=64))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 64, "temperature": 0, "stream": stream}
    assistant.delay = 0.02
    try:
        with serving(app) as url:
            if stream:
                with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
                    next(r.iter_lines())  # the first event, then hang up
            else:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/v1/completions", json=body, timeout=0.2)
            deadline = time.time() + 5
            while app.state.batcher.busy and time.time() < deadline:
                time.sleep(0.01)
            assert not app.state.batcher.busy
            assert app.state.batcher.steps < 32  # far from the 64 tokens asked for
    finally:
        assistant.delay = 0.0


def test_many_waiting_requests_do_not_starve_the_running_stream(
    assistant: SlowAssistant,
) -> None:
    """More requests waiting for a slot than the thread pool has threads (40): the stream
    holding the slot still gets its tokens, and the server still answers."""
    app = create_app(assistant, ServeConfig(max_tokens=16, max_concurrency=1, max_queue=44))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 16, "temperature": 0, "stream": True}
    short = {**body, "max_tokens": 1, "stream": False}
    assistant.delay = 0.03
    try:
        with serving(app) as url, httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)  # it holds the slot
                with ThreadPoolExecutor(44) as pool:
                    waiting = [
                        pool.submit(http.post, f"{url}/v1/completions", json=short)
                        for _ in range(44)
                    ]
                    time.sleep(0.5)  # all of them queued behind the stream
                    rest = [line for line in lines if line]
                    assert rest[-1] == "data: [DONE]"
                    assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
                    assert [w.result().status_code for w in waiting] == [200] * 44
    finally:
        assistant.delay = 0.0


def test_no_queue_still_serves_an_idle_server_and_seeds_vary(assistant: SlowAssistant) -> None:
    """max_queue 0 refuses waiting, not running; unseeded sampled requests differ (a fresh
    seed each), seeded ones repeat."""
    app = create_app(assistant, ServeConfig(max_tokens=12, max_concurrency=1, max_queue=0))
    body = {"model": "tiny", "prompt": "The river", "max_tokens": 12, "temperature": 1.0}
    with serving(app) as url:
        texts = []
        for seed in (None, None, None, 7, 7):
            r = httpx.post(f"{url}/v1/completions", json={**body, "seed": seed})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert len(set(texts[:3])) == 3 and texts[3] == texts[4]


def test_generation_failures_get_openai_errors_whole_or_streamed(
    assistant: SlowAssistant,
) -> None:
    """A failing model step: a JSON 500 for a whole reply, an error event mid-stream (the
    OpenAI client raises on both), and the server serves the next request."""
    fail = [False]

    def broken(*_: object) -> None:
        if fail[0]:
            raise FloatingPointError("the model produced NaN")

    hook = assistant.model.lm_head.register_forward_pre_hook(broken)
    app = create_app(assistant, ServeConfig(max_tokens=16))
    try:
        with serving(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            fail[0] = True
            with pytest.raises(openai.InternalServerError, match="FloatingPointError"):
                client.completions.create(model="tiny", prompt="hi", max_tokens=8)
            fail[0] = False
            stream = client.completions.create(
                model="tiny", prompt="hi", max_tokens=16, temperature=0, stream=True
            )
            with pytest.raises(openai.APIError, match="FloatingPointError"):
                for i, _ in enumerate(stream):
                    fail[0] = i >= 2  # after a few tokens
            fail[0] = False
            reply = client.completions.create(model="tiny", prompt="hi", max_tokens=4)
            assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        hook.remove()
