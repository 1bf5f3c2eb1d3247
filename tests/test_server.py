"""``expertswap serve``: driven with the official openai client against a real uvicorn server on a tiny model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from expertswap.cli.serve import main as serve
from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings
from expertswap.server import BackgroundServer

KEY = "sk-test"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


class Server(BackgroundServer):
    def __init__(self, engine: Engine, queue: int = 8) -> None:
        super().__init__(engine, "tiny", port=0, api_key=KEY, queue=queue)
        self.root = self.url.removesuffix("/v1")
        self._clients: list[openai.OpenAI] = []

    def client(self, key: str = KEY) -> openai.OpenAI:
        """A client closed by ``stop``: a pooled socket left to the garbage collector is a ResourceWarning,
        which this suite turns into an error in whichever test happens to collect it."""
        self._clients.append(openai.OpenAI(base_url=self.url, api_key=key, max_retries=0))
        return self._clients[-1]

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        super().stop()


@pytest.fixture
def server(tiny_model, open_engine) -> Iterator[Server]:
    running = Server(open_engine(tiny_model("qwen3_moe"), budget="50%"))
    yield running
    running.stop()


def _greedy(engine: Engine, n: int) -> str:
    return engine.decode(list(engine.generate(engine.encode_chat(MESSAGES), SamplingSettings(max_new_tokens=n))))


def test_chat_streamed_and_whole_give_the_engines_greedy_reply_and_usage(server: Server, tiny_model) -> None:
    client = server.client()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                              stream=True)
    parts = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=False) as engine:
        want = _greedy(engine, 8)
        prompt = len(engine.encode_chat(MESSAGES))
    assert whole.choices[0].message.content == "".join(parts) == want
    assert whole.choices[0].finish_reason == "length"
    usage = whole.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 8, prompt + 8)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_a_conversation_continued_reports_the_prompt_tokens_its_cache_held(server: Server) -> None:
    client = server.client()
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And the mountains?"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens  # only the new turn ran
    again = client.chat.completions.create(model="tiny", messages=turn, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == second.choices[0].message.content  # regenerated: the same reply
    assert again.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1


def test_stop_sequences_cut_the_reply(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_an_empty_stop_string_is_ignored(server: Server) -> None:
    """An empty stop matches everywhere: it used to hold back -1 characters, dropping the first of every piece."""
    client = server.client()
    full = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, temperature=0).choices[0]
    for stop in ["", [""], ["", "\x00never"]]:
        same = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, temperature=0, stop=stop)
        assert (same.choices[0].text, same.choices[0].finish_reason) == (full.text, full.finish_reason), stop
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stop="",
                                              stream=True)
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as many:  # OpenAI's limit, and each one is searched every token
        client.completions.create(model="tiny", prompt="The sea is", max_tokens=2, stop=list("abcde"))
    assert many.value.body["param"] == "stop"


def test_a_model_is_retrieved_by_its_id(server: Server) -> None:
    client = server.client()
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.body["param"] == "model"


def test_errors_have_openais_shape_and_status(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as bad:
        server.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=7)
    assert bad.value.body["param"] == "temperature"
    reply = httpx.post(f"{server.root}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "x " * 5000}]})
    assert reply.status_code == 413 and reply.json()["error"]["param"] == "messages"
    assert httpx.get(f"{server.root}/health").json() == {"status": "ok"}


def test_budget_and_stats_extension(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    stats = httpx.get(f"{server.root}/v1/expertswap/stats", headers=headers).json()
    moved = httpx.post(f"{server.root}/v1/expertswap/budget", headers=headers, json={"budget": "100%"}).json()
    assert moved["budget_bytes"] == stats["total_expert_bytes"] > stats["budget_bytes"]
    bad = httpx.post(f"{server.root}/v1/expertswap/budget", headers=headers, json={"budget": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "budget"


def test_a_disconnected_stream_cancels_its_reply(server: Server) -> None:
    client = server.client()
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=400, temperature=0,
                                            stream=True)
    content = 0
    for chunk in stream:
        content += bool(chunk.choices and chunk.choices[0].delta.content)
        if content == 3:
            break
    stream.close()  # the client goes away mid-reply
    counts = [-1]
    while counts[-1] != (now := server.engine.stats().tokens_generated):  # until the reply stops growing
        counts.append(now)
        time.sleep(0.3)
    assert 3 <= counts[-1] < 400  # cancelled, not run to its 400 tokens
    after = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert after.usage.completion_tokens == 2  # and the engine is free for the next one


def test_a_full_queue_answers_429_with_retry_after(tiny_model, open_engine) -> None:
    running = Server(open_engine(tiny_model("qwen3_moe"), budget="50%"), queue=0)
    try:
        async def two() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=running.root, headers={"Authorization": f"Bearer {KEY}"}) as c:
                body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 64}
                return list(await asyncio.gather(c.post("/v1/chat/completions", json=body),
                                                 c.post("/v1/chat/completions", json=body)))

        replies = sorted(asyncio.run(two()), key=lambda r: r.status_code)
        assert [r.status_code for r in replies] == [200, 429]
        assert replies[1].headers["retry-after"] == "1" and replies[1].json()["error"]["type"] == "rate_limit_exceeded"
    finally:
        running.stop()


def test_a_non_loopback_host_needs_an_api_key(capsys) -> None:
    assert serve(["--host", "0.0.0.0", "--model", "default"]) == 2
    assert "needs --api-key" in capsys.readouterr().err


def test_waiting_requests_are_answered_first_come_first_served(server: Server) -> None:
    async def five() -> list[int]:
        finished: list[int] = []
        async with httpx.AsyncClient(base_url=server.root, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as c:
            async def ask(n: int) -> None:
                await asyncio.sleep(0.02 * n)  # arrive in order 0..4, all while the first is answering
                body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "temperature": 0}
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
                finished.append(n)

            await asyncio.gather(*(ask(n) for n in range(5)))
        return finished

    assert asyncio.run(five()) == [0, 1, 2, 3, 4]


def test_a_request_while_the_engine_answers_elsewhere_is_503_busy(server: Server) -> None:
    """Served from the app, the window's own reply holds the engine: API requests are told to retry."""
    engine = server.engine
    local = engine.generate(engine.encode_chat(MESSAGES), SamplingSettings(max_new_tokens=400))
    next(local)  # the window's reply is under way
    try:
        reply = httpx.post(f"{server.root}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "server_busy"
        stream = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True)
        with pytest.raises(openai.APIError, match="already"):
            list(stream)
    finally:
        local.close()


PROMPTS = [f"Question {n}: what does the {word} do?" for n, word in
           enumerate(["sea", "wind", "list", "dict", "lambda", "class", "tuple", "set", "loop", "yield"])]


def _references(server: Server, tokens: int) -> dict[str, str]:
    """Each prompt's greedy reply from the server with nothing else going on (exact: the same at any budget)."""
    client = server.client()
    return {prompt: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=tokens, temperature=0).choices[0].message.content
            for prompt in PROMPTS}


def test_eight_concurrent_clients_get_what_each_would_get_alone(server: Server) -> None:
    want = _references(server, 12)

    async def eight() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0)

        async def ask(prompt: str, stream: bool) -> tuple[str, str]:
            kwargs = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                      "temperature": 0}
            if not stream:
                return prompt, (await client.chat.completions.create(**kwargs)).choices[0].message.content
            chunks = await client.chat.completions.create(stream=True, **kwargs)
            return prompt, "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        try:
            return list(await asyncio.gather(*(ask(p, n % 2 == 0) for n, p in enumerate(PROMPTS[:8]))))
        finally:
            await client.close()

    got = asyncio.run(eight())
    assert len(got) == 8 and all(text == want[prompt] for prompt, text in got)


def test_soak_200_requests_from_4_clients_with_budget_moves(server: Server) -> None:
    """No error, every reply equal to its greedy reference whatever the budget, and memory that levels off."""
    import random

    import psutil

    want = _references(server, 8)
    engine = server.engine
    process = psutil.Process()
    rng = random.Random(0)

    async def soak() -> tuple[list[bool], list[int]]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0)
        headers = {"Authorization": f"Bearer {KEY}"}
        same: list[bool] = []
        rss: list[int] = []

        async def user(n: int) -> None:
            for i in range(50):
                prompt = PROMPTS[(n * 50 + i) % len(PROMPTS)]
                reply = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
                same.append(reply.choices[0].message.content == want[prompt])
                if n == 0 and i % 10 == 0:
                    rss.append(process.memory_info().rss)

        async def mover() -> None:
            async with httpx.AsyncClient(base_url=server.root, headers=headers) as c:
                while len(same) < 200:
                    budget = rng.randint(engine.minimum_budget_bytes, engine.total_expert_bytes)
                    moved = await c.post("/v1/expertswap/budget", json={"budget": f"{budget}B"})
                    assert moved.status_code == 200, moved.text
                    await asyncio.sleep(0.02)

        try:
            await asyncio.gather(*(user(n) for n in range(4)), mover())
        finally:
            await client.close()
        return same, rss

    same, rss = asyncio.run(soak())
    assert len(same) == 200 and all(same)
    assert max(rss[1:]) - rss[1] < 64 * 2**20, [r // 2**20 for r in rss]  # after the first tenth: flat
