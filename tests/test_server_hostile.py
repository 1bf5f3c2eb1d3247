"""``expertswap serve`` against hostile and careless clients (issue 27), spoken byte by byte over real sockets.

DNS rebinding (Host, Origin), oversized bodies, a client that drops a whole reply, errors mid-reply, malformed
bodies, and requests that must not hold the event loop: every answer is checked on the wire, and every error
must be OpenAI's JSON shape on a connection that stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import h11
import httpx
import pytest

from expertswap.cli.serve import parser
from expertswap.engine import Engine, TokenChunk
from expertswap.protocol import SamplingSettings, SettingsError, TokenStats
from expertswap.server import BackgroundServer
from expertswap.server.errors import from_exception
from expertswap.server.guard import Guard
from expertswap.server.turns import Turns

KEY = "sk-hostile"
TIMEOUT = 30.0  # a socket read that waits this long is a hang: the test fails instead of waiting forever
PROMPT_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea."}]}


class Wire:
    """One HTTP/1.1 keep-alive connection spoken by hand (h11 frames it): the test decides every byte sent."""

    def __init__(self, server: BackgroundServer) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        self.http = h11.Connection(h11.CLIENT)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             end: bool = True) -> None:
        """A request; a body without ``Content-Length`` in ``headers`` goes chunked. ``end=False`` leaves it open."""
        fields = {"Host": "127.0.0.1", **(headers or {})}
        if body is not None and "Content-Length" not in fields:
            fields["Transfer-Encoding"] = "chunked"
        raw = [(k, v.encode("latin-1")) for k, v in fields.items()]  # as Starlette reads them: any byte goes
        self.write(h11.Request(method=method, target=path, headers=raw))
        if body:
            self.write(h11.Data(data=body))
        if end:
            self.write(h11.EndOfMessage())

    def write(self, event: h11.Event) -> None:
        self.sock.sendall(self.http.send(event) or b"")

    def receive(self) -> tuple[int, dict[str, str], bytes]:
        """The next whole response: status, headers, body."""
        status, headers, body = 0, {}, b""
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """A request and its response; the connection must then be ready for another (keep-alive kept)."""
        if body is not None:
            headers = {"Content-Length": str(len(body)), "Content-Type": "application/json", **(headers or {})}
        self.send(method, path, body, headers)
        answer = self.receive()
        self.http.start_next_cycle()  # raises if either side has to close the connection
        return answer


def _wait_for(condition: Callable[[], bool], seconds: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds; fail once ``seconds`` have gone by."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"not within {seconds} s"
        time.sleep(0.01)


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def _events(body: bytes) -> list[str]:
    """A stream's events, each without its ``data: ``."""
    return [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]


def _error(status: int, body: bytes) -> dict[str, Any]:
    """The error of an answer in OpenAI's shape, exactly: ``{"error": {message, type, param, code}}``."""
    answer = json.loads(body)
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"], answer
    assert status >= 400
    return dict(answer["error"])


@pytest.fixture
def serve(tiny_model, open_engine) -> Iterator[Callable[..., BackgroundServer]]:
    """``serve(api_key=None, max_body_bytes=...)``: the tiny model's server on a free loopback port, stopped at
    the end (before its engine is closed)."""
    servers: list[BackgroundServer] = []

    def start(**kwargs: Any) -> BackgroundServer:
        servers.append(BackgroundServer(open_engine(tiny_model("qwen3_moe"), budget="50%"), "tiny", port=0,
                                        **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


LOCAL_HOSTS = ["localhost", "LocalHost:8000", "127.0.0.1", "127.0.0.1:1", "127.8.9.10:80", "[::1]", "[::1]:8000"]
FOREIGN_HOSTS = ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example",
                 "10.0.0.1", "[::1]x", "localhost:", "localhost:80x", ""]
LOCAL_ORIGINS = ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:5173", "HTTP://LOCALHOST"]
FOREIGN_ORIGINS = ["http://evil.example", "null", "http://localhost.evil.example", "http://localhost@evil.example",
                   "file://", "ftp://localhost", "http://127.0.0.1:80/path"]


def test_without_a_key_only_loopback_hosts_and_origins_are_answered(serve) -> None:
    """A page re-pointed at 127.0.0.1 by DNS rebinding sends its own name as Host: it may not set the budget,
    switch the policy or read a completion; nor may a foreign page (its Origin) that reaches 127.0.0.1."""
    server = serve()
    before = server.engine.budget_bytes
    with Wire(server) as wire:
        for host in LOCAL_HOSTS:
            assert wire.exchange("GET", "/v1/models", headers={"Host": host})[0] == 200, host
        for origin in LOCAL_ORIGINS:
            assert wire.exchange("GET", "/v1/models", headers={"Origin": origin})[0] == 200, origin
        refused = [("GET", "/v1/models", None), ("POST", "/v1/expertswap/budget", _json({"budget": "100%"})),
                   ("POST", "/v1/expertswap/policy", _json({"policy": "substitute"})),
                   ("POST", "/v1/chat/completions", _json({**PROMPT_CHAT, "max_tokens": 2}))]
        for method, path, body in refused:
            for headers in [{"Host": h} for h in FOREIGN_HOSTS] + [{"Origin": o} for o in FOREIGN_ORIGINS]:
                status, _, answer = wire.exchange(method, path, body, headers)
                assert status == 403 and _error(status, answer)["type"] == "permission_error", (path, headers)
    assert server.engine.budget_bytes == before and server.engine.policy != "substitute"


def test_with_a_key_the_key_is_the_guard_in_any_case_of_bearer(serve) -> None:
    server = serve(api_key=KEY)
    with Wire(server) as wire:
        for scheme in ["Bearer", "bearer", "BEARER"]:
            headers = {"Host": "evil.example", "Origin": "http://evil.example", "Authorization": f"{scheme} {KEY}"}
            assert wire.exchange("GET", "/v1/models", headers=headers)[0] == 200, scheme
        for authorization in [None, f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", "Bearer", KEY,
                              "Bearer s\u00e9cret"]:
            headers = {} if authorization is None else {"Authorization": authorization}
            status, _, answer = wire.exchange("GET", "/v1/models", headers=headers)
            assert status == 401 and "API key" in _error(status, answer)["message"], authorization
        assert wire.exchange("GET", "/health")[0] == 200  # open, as before: it tells nothing


def test_a_body_over_the_limit_is_refused_before_it_is_read(serve) -> None:
    """By its Content-Length, before a byte of it is sent; chunked, as soon as it grows past the limit. Under the
    limit it is answered as ever, on the same connection."""
    server = serve(max_body_bytes=4096)
    with Wire(server) as wire:  # 50 MB announced, none sent: the answer may not wait for it
        wire.send("POST", "/v1/completions", headers={"Content-Length": str(50 * 2**20),
                                                      "Content-Type": "application/json"}, end=False)
        status, _, answer = wire.receive()
        assert status == 413 and "4096 bytes" in _error(status, answer)["message"]
    with Wire(server) as wire:
        wire.send("POST", "/v1/completions", body=b" " * 3000, headers={"Content-Type": "application/json"},
                  end=False)
        wire.write(h11.Data(data=b" " * 3000))  # 6000 bytes chunked: over
        status, _, answer = wire.receive()
        assert status == 413 and _error(status, answer)["type"] == "invalid_request_error"
        wire.write(h11.EndOfMessage())
        wire.http.start_next_cycle()
        body = _json({"model": "tiny", "prompt": "The sea", "max_tokens": 1}) + b" " * 4000  # 4044 bytes: under
        assert wire.exchange("POST", "/v1/completions", body)[0] == 200


def test_the_body_limit_defaults_to_8_mib_and_serve_takes_another() -> None:
    assert parser().parse_args([]).max_body_bytes == 8 * 2**20
    assert parser().parse_args(["--max-body-bytes", "1024"]).max_body_bytes == 1024
    with pytest.raises(SystemExit):
        parser().parse_args(["--max-body-bytes", "0"])


def test_a_prompt_too_long_for_the_context_in_characters_is_never_encoded(serve, monkeypatch) -> None:
    server = serve()
    engine = server.engine

    def never(*_: object) -> list[int]:
        raise AssertionError("encoded a prompt that cannot fit")

    monkeypatch.setattr(engine, "encode", never)
    monkeypatch.setattr(engine, "encode_chat", never)
    too_long = "x" * (64 * engine.context_tokens + 1)
    with Wire(server) as wire:
        for path, body, field in [
                ("/v1/completions", {"model": "tiny", "prompt": too_long}, "prompt"),
                ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": too_long}]},
                 "messages")]:
            status, _, answer = wire.exchange("POST", path, _json(body))
            error = _error(status, answer)
            assert status == 413 and "characters" in error["message"] and error["param"] == field


def _token_counts(events: list[object]) -> list[int]:
    """Each reply's token count, from the engine's per-token telemetry (the count restarts at 1 for each)."""
    replies: list[int] = []
    for event in events:
        if isinstance(event, TokenStats):
            replies = [*replies, 1] if event.tokens == 1 else [*replies[:-1], event.tokens]
    return replies


def _held_until_cancelled(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next reply waits after its first token, on the engine's generation thread, until it is cancelled (or
    ``TIMEOUT``): it can end only by being cancelled, however fast the model or slow the machine. Later replies
    run as ever."""
    generate = engine.decoder.generate
    first = [True]

    def held(ids: list[int], settings: SamplingSettings, cancel: threading.Event,
             logprobs: list | None = None) -> Iterator[int]:
        hold, first[0] = first[0], False
        for token in generate(ids, settings, cancel, logprobs):
            yield token
            if hold:
                cancel.wait(TIMEOUT)

    monkeypatch.setattr(engine.decoder, "generate", held)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_drops_its_reply_cancels_it_and_the_next_is_answered(serve, monkeypatch,
                                                                           stream: bool) -> None:
    """The reply stops when the client goes, and the engine is free when the next request gets its turn: it is
    answered at once, not after the dropped reply's 900 tokens, nor refused as busy."""
    server = serve()
    _held_until_cancelled(server.engine, monkeypatch)
    events = server.engine.subscribe()
    seen: list[object] = []

    def under_way() -> bool:
        seen.extend(events.drain())
        return bool(_token_counts(seen))

    try:
        with Wire(server) as wire:  # sent, and dropped once the reply is under way
            body = {**PROMPT_CHAT, "max_tokens": 900, "temperature": 0, "stream": stream}
            wire.send("POST", "/v1/chat/completions", _json(body), {"Content-Type": "application/json"})
            _wait_for(under_way)
        with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=TIMEOUT) as client:
            after = client.post("/v1/chat/completions", json={**PROMPT_CHAT, "max_tokens": 2})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
        seen.extend(events.drain())
        dropped, answered = _token_counts(seen)
        assert dropped == 1 and answered == 2  # held after its first token until it was cancelled
    finally:
        events.close()


def _failing_after_one_token(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's stream raises mid-reply, as a device error would."""
    real = engine.stream_ids

    async def failing(ids: list[int], settings: SamplingSettings) -> AsyncIterator[TokenChunk]:
        async with contextlib.aclosing(real(ids, settings)) as stream:
            async for chunk in stream:
                yield chunk
                raise RuntimeError("the device fell over")

    monkeypatch.setattr(engine, "stream_ids", failing)


def test_an_error_mid_reply_is_a_json_500_or_an_error_event_and_the_connection_lives(serve, monkeypatch) -> None:
    server = serve()
    _failing_after_one_token(server.engine, monkeypatch)
    with Wire(server) as wire:
        status, _, answer = wire.exchange("POST", "/v1/chat/completions", _json({**PROMPT_CHAT, "max_tokens": 8}))
        error = _error(status, answer)
        assert status == 500 and error["type"] == "server_error" and "the device fell over" in error["message"]
        assert wire.exchange("GET", "/health")[0] == 200  # the same connection, still open
        status, headers, answer = wire.exchange("POST", "/v1/chat/completions",
                                                _json({**PROMPT_CHAT, "max_tokens": 8, "stream": True}))
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        events = _events(answer)
        assert events[-1] == "[DONE]" and "the device fell over" in _error(500, events[-2].encode())["message"]
        assert "error" not in json.loads(events[0])  # the role chunk went out before the failure
        assert wire.exchange("GET", "/health")[0] == 200


def test_a_seed_out_of_range_is_a_400_before_any_reply_streamed_or_not(serve) -> None:
    server = serve()
    with Wire(server) as wire:
        for stream in (False, True):
            for seed in (2**64, 2**63, -(2**63) - 1):
                body = _json({**PROMPT_CHAT, "max_tokens": 2, "seed": seed, "stream": stream})
                status, _, answer = wire.exchange("POST", "/v1/chat/completions", body)
                assert status == 400 and _error(status, answer)["param"] == "seed", (seed, stream)
        for seed in (2**63 - 1, -(2**63)):
            body = _json({**PROMPT_CHAT, "max_tokens": 2, "seed": seed, "temperature": 1})
            assert wire.exchange("POST", "/v1/chat/completions", body)[0] == 200, seed


MIXTRAL_STYLE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "[INST] {{ m['content'] }} [/INST]{% endfor %}"
)


def test_a_template_that_refuses_the_messages_is_a_400_with_its_message(serve, monkeypatch) -> None:
    server = serve()
    monkeypatch.setattr(server.engine.tokenizer, "chat_template", MIXTRAL_STYLE)
    twice = {"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with Wire(server) as wire:
        for stream in (False, True):
            status, _, answer = wire.exchange("POST", "/v1/chat/completions", _json({**twice, "stream": stream}))
            error = _error(status, answer)
            assert status == 400 and "Conversation roles must alternate" in error["message"]
            assert error["param"] == "messages"


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', None),  # not UTF-8
    (b"[" * 100_000, None),  # nested deeper than any parser goes
    (b'{"model": "tiny", "prompt": ', None),  # cut short: no character offset as the param
    (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', "temperature"),
])
def test_a_body_that_is_not_a_request_is_a_400_in_openais_shape(serve, body: bytes, param: str | None) -> None:
    server = serve()
    with Wire(server) as wire:
        status, _, answer = wire.exchange("POST", "/v1/completions", body)
        assert status == 400 and _error(status, answer)["param"] == param


def test_unknown_paths_and_methods_are_errors_in_openais_shape(serve) -> None:
    server = serve()
    with Wire(server) as wire:
        for method, path, want in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                   ("DELETE", "/v1/models", 405), ("GET", "/v1/models/gpt-9", 404)]:
            status, _, answer = wire.exchange(method, path)
            assert status == want and _error(status, answer)["type"] == "invalid_request_error", path
        status, _, answer = wire.exchange("GET", "/v1/models/tiny")
        assert status == 200 and json.loads(answer)["id"] == "tiny"


def _blocking(engine: Engine, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """``engine.<name>`` made to hold until released, as a huge prompt or a looping template would: (started,
    release)."""
    real = getattr(engine, name)
    started, release = threading.Event(), threading.Event()

    def held(*args: Any) -> Any:
        started.set()
        release.wait(TIMEOUT)
        return real(*args)

    monkeypatch.setattr(engine, name, held)
    return started, release


@pytest.mark.parametrize(("name", "method", "path", "body"), [
    ("encode_chat", "POST", "/v1/chat/completions", {**PROMPT_CHAT, "max_tokens": 1}),
    ("encode", "POST", "/v1/completions", {"model": "tiny", "prompt": "The sea", "max_tokens": 1}),
])
def test_the_event_loop_answers_while_a_request_is_slow_to_prepare(serve, monkeypatch, name: str, method: str,
                                                                   path: str, body: dict | None) -> None:
    """Encoding a prompt runs off the event loop: /health answers meanwhile."""
    server = serve()
    started, release = _blocking(server.engine, name, monkeypatch)

    async def meanwhile() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=server.url.removesuffix("/v1"), timeout=TIMEOUT) as client:
            slow = asyncio.ensure_future(client.request(method, path, json=body))
            try:
                assert await asyncio.to_thread(started.wait, TIMEOUT)
                health = await client.get("/health", timeout=5.0)
                assert not slow.done()
            finally:
                release.set()
            return health.status_code, (await slow).status_code

    assert asyncio.run(meanwhile()) == (200, 200)


def test_a_looping_template_is_stopped_with_a_400(serve, monkeypatch) -> None:
    """Nested loops would render for hours (the sandbox caps one ``range``, not their product)."""
    server = serve()
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + MIXTRAL_STYLE
    monkeypatch.setattr(server.engine.tokenizer, "chat_template", looping)
    with Wire(server) as wire:
        status, _, answer = wire.exchange("POST", "/v1/chat/completions", _json(PROMPT_CHAT))
        assert status == 400 and _error(status, answer)["param"] == "messages"
        assert wire.exchange("GET", "/health")[0] == 200


def _queues(monkeypatch: pytest.MonkeyPatch) -> list[Turns]:
    """The queue of each request that asks for a turn, as it asks (a server has one: ``[0]`` is it)."""
    seen: list[Turns] = []
    take = Turns.take

    async def spied(self: Turns) -> None:
        seen.append(self)
        await take(self)

    monkeypatch.setattr(Turns, "take", spied)
    return seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_a_429_before_the_prompt_is_encoded(serve, monkeypatch, stream: bool) -> None:
    """A prompt is encoded in its request's turn, one at a time: a request the queue has no place for is refused at
    once, unencoded (issue 27: an 8 MiB body each, encoded all at once, was the memory blow-up)."""
    server = serve(queue=0)
    started, release = _blocking(server.engine, "encode_chat", monkeypatch)
    held, encoded = server.engine.encode_chat, []

    def counted(messages: list[dict[str, str]], tools: list | None = None) -> list[int]:
        encoded.append(messages)
        return list(held(messages, tools))

    monkeypatch.setattr(server.engine, "encode_chat", counted)
    with Wire(server) as first, Wire(server) as refused:
        first.send("POST", "/v1/chat/completions", _json({**PROMPT_CHAT, "max_tokens": 1}),
                   {"Content-Type": "application/json"})
        try:
            assert started.wait(TIMEOUT)  # the first holds the turn, its prompt being encoded
            status, headers, answer = refused.exchange("POST", "/v1/chat/completions",
                                                       _json({**PROMPT_CHAT, "stream": stream}))
        finally:
            release.set()
        assert status == 429 and headers["retry-after"] == "1"
        assert _error(status, answer)["type"] == "rate_limit_exceeded" and len(encoded) == 1
        assert first.receive()[0] == 200


def test_a_stream_that_leaves_while_queued_gives_its_place_up(serve, monkeypatch) -> None:
    """As a request waiting for a whole reply does: the place is free for the next request at once, not when the
    gone stream's turn comes."""
    server = serve(queue=1)
    started, release = _blocking(server.engine, "encode_chat", monkeypatch)
    queues = _queues(monkeypatch)
    with Wire(server) as first, Wire(server) as nxt:
        first.send("POST", "/v1/chat/completions", _json({**PROMPT_CHAT, "max_tokens": 1}),
                   {"Content-Type": "application/json"})
        try:
            assert started.wait(TIMEOUT)  # the first holds the turn
            with Wire(server) as gone:
                gone.send("POST", "/v1/chat/completions", _json({**PROMPT_CHAT, "stream": True}),
                          {"Content-Type": "application/json"})
                _wait_for(lambda: bool(queues) and queues[0].waiting == 1)
            _wait_for(lambda: queues[0].waiting == 0)  # the stream's client left: its place is given up
            nxt.send("POST", "/v1/chat/completions", _json({**PROMPT_CHAT, "max_tokens": 1}),
                     {"Content-Type": "application/json"})
            _wait_for(lambda: queues[0].waiting == 1)  # queued in that place, not refused
        finally:
            release.set()
        assert first.receive()[0] == 200 and nxt.receive()[0] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_or_settings_the_engine_refuses_are_a_400(serve, monkeypatch, stream: bool) -> None:
    """A prompt that encodes to no tokens is the request's fault (PromptError), as are settings out of range
    (SettingsError): 400 invalid_request_error, in a stream its error event."""
    server = serve()
    monkeypatch.setattr(server.engine, "encode", lambda _text: [])
    with Wire(server) as wire:
        body = _json({"model": "tiny", "prompt": "The sea", "max_tokens": 4, "stream": stream})
        status, _, answer = wire.exchange("POST", "/v1/completions", body)
        if stream:
            events = _events(answer)
            assert status == 200 and events[-1] == "[DONE]"
            status, answer = 400, events[-2].encode()
        error = _error(status, answer)
        assert status == 400 and error["type"] == "invalid_request_error" and "empty" in error["message"]
    refused = from_exception(SettingsError("top_p must be in (0, 1], got 0"))
    assert (refused.status, refused.kind) == (400, "invalid_request_error")


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_the_context_cuts_ends_with_finish_reason_length(serve, monkeypatch, stream: bool) -> None:
    """The engine cuts the reply at the context; the answer says so ("length", not "stop"), as it does for
    max_tokens."""
    server = serve()
    engine = server.engine
    room = 3
    ids = (engine.encode("The sea is wide and deep. ") * engine.context_tokens)[: engine.context_tokens - room]
    monkeypatch.setattr(engine, "encode", lambda _text: ids)
    with Wire(server) as wire:
        body = {"model": "tiny", "prompt": "The sea", "max_tokens": 500, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        status, _, answer = wire.exchange("POST", "/v1/completions", _json(body))
    assert status == 200
    events = [json.loads(e) for e in _events(answer)[:-1]] if stream else [json.loads(answer)]
    assert events[-2 if stream else -1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": room,
                              "total_tokens": engine.context_tokens, "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_websocket_is_refused_before_the_app_sees_it() -> None:
    """No route takes a websocket, and one would pass none of the Host, Origin and key checks: it is closed at
    once (policy violation: its handshake is answered 403). The server's lifespan still reaches the app."""
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], _receive: Any, _send: Any) -> None:
        reached.append(scope["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for key in (None, KEY):
        asyncio.run(Guard(app, key)({"type": "websocket", "path": "/v1/models", "headers": [(b"host", b"localhost")]},
                                    receive, send))
    asyncio.run(Guard(app, None)({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] * 2 and reached == ["lifespan"]
