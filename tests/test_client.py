"""The app's client of OpenAI-compatible servers: ExpertSwap's own (figures, budget, telemetry follow it) and a
plain one (chat only, panels off with a reason), against real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from expertswap.client import RemoteEngine, RemoteError, api_root
from expertswap.engine import Engine
from expertswap.protocol import BudgetError, ResidencySnapshot, SamplingSettings, SwapEvent, TokenStats

from .test_server import KEY, MESSAGES, Server, _greedy


@pytest.fixture
def server(tiny_model, open_engine) -> Iterator[Server]:
    running = Server(open_engine(tiny_model("qwen3_moe"), budget="50%"))
    yield running
    running.stop()


@pytest.fixture
def remote(server: Server) -> Iterator[RemoteEngine]:
    engine = RemoteEngine.connect(server.url, KEY)
    yield engine
    engine.close()


def _reply(remote: RemoteEngine, settings: SamplingSettings, stop_after: int | None = None) -> str:
    async def collect() -> str:
        text = ""
        async for chunk in remote.stream_chat(MESSAGES, settings):
            text += chunk.text
            if stop_after is not None and len(text) >= stop_after:
                remote.cancel()
        return text

    return asyncio.run(collect())


def test_an_expertswap_server_reports_what_a_local_engine_does(server: Server, remote: RemoteEngine) -> None:
    engine = server.engine
    assert (remote.model, remote.expertswap, remote.unavailable) == ("tiny", True, "")
    assert (remote.total_expert_bytes, remote.minimum_budget_bytes, remote.budget_bytes, remote.total_experts) == (
        engine.total_expert_bytes, engine.minimum_budget_bytes, engine.budget_bytes, engine.total_experts)
    assert remote.policies == engine.policies and remote.policy == "exact"
    low, span = engine.minimum_budget_bytes, engine.total_expert_bytes - engine.minimum_budget_bytes
    for budget in [engine.budget_bytes] + [low + span * step // 1000 for step in (0, 1, 333, 500, 999, 1000)]:
        assert remote.committee_size(budget) == engine.committee_size(budget), budget
    local, far = engine.stats(), remote.stats()  # one record on both sides: the same type, the same figures
    assert type(far) is type(local) and (far.budget_bytes, far.total_expert_bytes) == (
        local.budget_bytes, local.total_expert_bytes)
    assert remote.residency().resident == engine.residency().resident


def test_a_remote_reply_is_the_engines_greedy_reply_and_telemetry_follows(server: Server,
                                                                          remote: RemoteEngine) -> None:
    subscription = remote.subscribe()
    text = _reply(remote, SamplingSettings(max_new_tokens=8))
    with Engine.load(server.engine.model.config.name_or_path, budget="100%", swapper=False) as local:
        assert text == _greedy(local, 8)
    events: list[object] = []
    deadline = time.monotonic() + 5
    while not any(isinstance(e, TokenStats) and e.tokens == 8 for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
        events += subscription.drain()
    assert isinstance(events[0], ResidencySnapshot)  # a new follower starts from the committees as they are
    assert any(isinstance(e, TokenStats) and e.tokens == 8 for e in events)
    assert any(isinstance(e, SwapEvent) for e in events)  # 50%: the reply swapped experts
    later = remote.subscribe()  # the poller runs already: this one is owed the committees too, first
    first = _first_event(later)
    assert isinstance(first, ResidencySnapshot) and first.resident == server.engine.residency().resident
    later.close()
    subscription.close()


def _first_event(subscription: object, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = subscription.get(timeout=0.1)  # type: ignore[attr-defined]
        if got is not None:
            return got
    raise AssertionError("no event arrived")


def test_cancel_drops_the_reply_on_the_server(server: Server, remote: RemoteEngine) -> None:
    # uncancelled, the reply fills the context (no EOS): ~1000 tokens at ~900 tok/s
    assert _reply(remote, SamplingSettings(max_new_tokens=5000), stop_after=1)
    time.sleep(0.5)  # the server notices the closed connection at its next token
    assert server.engine.stats().tokens_generated < 500
    assert _reply(remote, SamplingSettings(max_new_tokens=3))  # the engine is free again


def test_budget_and_policy_move_the_remote_engine(server: Server, remote: RemoteEngine) -> None:
    assert remote.set_budget("100%") == server.engine.total_expert_bytes
    deadline = time.monotonic() + 5
    while server.engine.budget_bytes != server.engine.total_expert_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.budget_bytes == server.engine.total_expert_bytes
    with pytest.raises(BudgetError):
        remote.set_budget("lots")
    remote.set_policy("substitute")
    assert server.engine.policy == "substitute" and remote.policy == "substitute"


def test_bad_addresses_and_keys_are_one_line_errors(server: Server) -> None:
    with pytest.raises(RemoteError, match="refused the API key"):
        RemoteEngine.connect(server.url, "sk-wrong")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(RemoteError, match="cannot reach") as info:
        RemoteEngine.connect(f"http://127.0.0.1:{free}")
    assert "\n" not in str(info.value)
    with pytest.raises(RemoteError, match="not an http"):
        RemoteEngine.connect("localhost:8000")
    assert api_root("http://h:1") == api_root("http://h:1/v1/") == "http://h:1/v1/"


def _plain_server() -> FastAPI:
    """What llama-server, vLLM or LM Studio answer: models and streamed chat, no ExpertSwap endpoints."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": "llama-3", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def pieces() -> AsyncIterator[str]:
            for text in ("Hello", " there", "!"):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': text}}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(pieces(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def plain_server() -> Iterator[str]:
    """``_plain_server()`` served on a free loopback port, as its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(_plain_server(), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="plain-server")
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(10)


def test_any_openai_server_chats_and_says_why_the_panels_are_off() -> None:
    with plain_server() as url:
        remote = RemoteEngine.connect(url)
        try:
            assert remote.model == "llama-3" and not remote.expertswap
            assert remote.unavailable == "not an ExpertSwap server: it reports no experts"
            assert _reply(remote, SamplingSettings(max_new_tokens=5)) == "Hello there!"
            with pytest.raises(RemoteError, match="not an ExpertSwap server"):
                remote.set_budget("50%")
            assert remote.subscribe().drain() == []
        finally:
            remote.close()


def test_a_reply_cancelled_before_it_starts_ends_at_once(remote: RemoteEngine) -> None:
    """Stop pressed right after Send: the request never started on the client's loop, and the wait still ends."""
    async def cancelled_first() -> list[str]:
        remote._loop.call_soon_threadsafe(time.sleep, 0.3)  # the client's loop is busy for a moment
        stream = remote.stream_chat(MESSAGES, SamplingSettings(max_new_tokens=50))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # the request is queued behind the busy moment
        remote.cancel()
        try:
            return [(await first).text]
        except StopAsyncIteration:
            return []

    assert asyncio.run(asyncio.wait_for(cancelled_first(), 10)) == []


def test_calls_after_close_or_cut_by_it_are_one_line_errors_not_hangs(server: Server) -> None:
    """The app closed the connection (new chat source, quit) while a budget request was on its way."""
    remote = RemoteEngine.connect(server.url, KEY)
    remote._loop.call_soon_threadsafe(time.sleep, 0.5)  # the client's loop is busy: the call waits in line
    outcome: list[BaseException] = []
    caller = threading.Thread(target=lambda: _record(outcome, lambda: remote.set_budget("25%")))
    caller.start()
    time.sleep(0.1)
    remote.close()
    caller.join(timeout=10)
    assert not caller.is_alive() and len(outcome) == 1 and isinstance(outcome[0], RemoteError)
    assert "closed" in str(outcome[0])
    for call in (lambda: remote.set_budget("50%"), remote.residency):
        with pytest.raises(RemoteError, match="is closed"):
            call()


def _record(outcome: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except BaseException as exc:  # the test looks at what the caller got
        outcome.append(exc)


def test_a_remote_reply_takes_the_settings_a_local_one_does(server: Server, remote: RemoteEngine) -> None:
    """Penalties, bias, top-k and a JSON constraint reach the server; a grammar, which OpenAI's API cannot carry,
    is a one-line refusal, not a hang."""
    from expertswap.protocol import Constraint, SettingsError

    engine = server.engine
    shaped = SamplingSettings(max_new_tokens=8, presence_penalty=2.0, frequency_penalty=1.0, top_k=5,
                              logit_bias=((7, -100.0),))
    ids = engine.encode_chat(MESSAGES)
    want = engine.decode(list(engine.generate(ids, shaped)))
    assert _reply(remote, shaped) == want
    assert _reply(remote, SamplingSettings(max_new_tokens=20, constraint=Constraint("json"))).startswith("{")
    with pytest.raises(SettingsError, match="grammar"):
        _reply(remote, SamplingSettings(constraint=Constraint("lark", 'start: "x"')))
