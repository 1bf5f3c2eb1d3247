"""Anthropic's Messages API on the same engine, driven with the official ``anthropic`` client (sync, async,
streaming) and on the wire: text, system prompts, stop sequences, tools, errors in Anthropic's shape, the key as
``x-api-key``; and llm-comply's Anthropic suite against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import llm_comply
import pytest
from llm_comply.schema import SpecLoader

from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings

from .test_conformance import BIN, SKIPPED, served  # noqa: F401  (a fixture)
from .test_server import KEY, MESSAGES, Server

WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "input_schema": {"type": "object", "required": ["city"],
                            "properties": {"city": {"type": "string", "maxLength": 12}}}}

GREEDY = {"temperature": 0}  # the SDK no longer takes sampling arguments; the API still does


@pytest.fixture
def server(tiny_model, open_engine) -> Iterator[Server]:
    running = Server(open_engine(tiny_model("qwen3_moe"), budget="50%"))
    yield running
    running.stop()


def _client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.root, api_key=KEY, max_retries=0)


def test_a_message_is_the_engines_greedy_reply_whole_and_streamed(server: Server, tiny_model) -> None:
    with _client(server) as client:
        whole = client.messages.create(model="tiny", max_tokens=8, extra_body=GREEDY, messages=MESSAGES)
        with client.messages.stream(model="tiny", max_tokens=8, extra_body=GREEDY, messages=MESSAGES) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=False) as engine:
        ids = engine.encode_chat(MESSAGES)
        want = engine.decode(list(engine.generate(ids, SamplingSettings(max_new_tokens=8))))
    assert whole.content[0].text == streamed == want and whole.id.startswith("msg_")
    assert whole.stop_reason == final.stop_reason == "max_tokens" and whole.role == "assistant"
    assert whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0) == len(ids)
    assert whole.usage.output_tokens == final.usage.output_tokens == 8


def test_system_prompt_stop_sequences_and_the_async_client(server: Server) -> None:
    with _client(server) as client:
        full = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY, system="Be brief.",
                                      messages=MESSAGES).content[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]

    async def cut() -> anthropic.types.Message:
        async with anthropic.AsyncAnthropic(base_url=server.root, api_key=KEY, max_retries=0) as client:
            return await client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY, stop_sequences=[stop],
                                                system=[{"type": "text", "text": "Be brief."}], messages=MESSAGES)

    message = asyncio.run(cut())
    assert message.content[0].text == full[: full.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


def test_tools_any_always_gives_a_valid_tool_use_and_a_result_continues(server: Server) -> None:
    with _client(server) as client:
        for seed in range(2):
            message = client.messages.create(model="tiny", max_tokens=400, extra_body={"temperature": 1.0},
                                             tools=[WEATHER],
                                             tool_choice={"type": "any"},
                                             messages=[{"role": "user", "content": f"Weather? {seed}"}])
            uses = [b for b in message.content if b.type == "tool_use"]
            assert message.stop_reason == "tool_use" and len(uses) == 1
            jsonschema.validate(uses[0].input, {**WEATHER["input_schema"], "additionalProperties": False})
        with client.messages.stream(model="tiny", max_tokens=400, tools=[WEATHER],
                                    tool_choice={"type": "tool", "name": "get_weather"},
                                    messages=[{"role": "user", "content": "Weather?"}]) as stream:
            streamed = stream.get_final_message()
        use = next(b for b in streamed.content if b.type == "tool_use")
        assert streamed.stop_reason == "tool_use" and "city" in use.input
        after = client.messages.create(model="tiny", max_tokens=6, tools=[WEATHER], messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                               "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]}])
        assert after.stop_reason in ("end_turn", "max_tokens", "tool_use")
        counted = client.messages.count_tokens(model="tiny", messages=MESSAGES)
        schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
                  "properties": {"ok": {"type": "boolean"}}}
        shaped = client.messages.create(model="tiny", max_tokens=60, messages=MESSAGES,
                                        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert counted.input_tokens == len(server.engine.encode_chat(MESSAGES))
    jsonschema.validate(json.loads(shaped.content[0].text), schema)  # structured output, held to its schema


def test_errors_come_in_anthropics_shape_and_the_key_as_x_api_key(server: Server) -> None:
    url = f"{server.root}/v1/messages"
    body = {"model": "tiny", "max_tokens": 4, "messages": MESSAGES}
    assert httpx.post(url, json=body, headers={"x-api-key": KEY}).status_code == 200
    refused = httpx.post(url, json=body, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401 and refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "authentication_error"
    for bad, field in (({**body, "junk": 1}, "junk"), ({"model": "tiny", "messages": MESSAGES}, "max_tokens"),
                       ({**body, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking")):
        answer = httpx.post(url, json=bad, headers={"x-api-key": KEY})
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
        assert answer.json()["error"]["message"].startswith(field)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    answer = httpx.post(url, json={**body, "messages": [{"role": "user", "content": [image]}]},
                        headers={"x-api-key": KEY})
    assert answer.status_code == 400 and "text only" in answer.json()["error"]["message"]
    with _client(server) as client, pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="other", max_tokens=4, messages=MESSAGES)


def test_a_message_on_the_wire_matches_anthropics_spec(server: Server) -> None:
    spec = SpecLoader(str(Path(llm_comply.__file__).parent / "specs" / "anthropic.json"))
    for extra in ({}, {"tools": [WEATHER], "tool_choice": {"type": "any"}, "max_tokens": 400}):
        answer = httpx.post(f"{server.root}/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                            json={"model": "tiny", "max_tokens": 6, "messages": MESSAGES, **extra})
        assert spec.validate(answer.json(), "Message") == [], answer.json()


def test_streamed_events_come_in_anthropics_order(server: Server) -> None:
    with httpx.stream("POST", f"{server.root}/v1/messages", headers={"x-api-key": KEY}, timeout=60, json={
            "model": "tiny", "max_tokens": 5, "temperature": 0, "stream": True, "messages": MESSAGES}) as answer:
        lines = [line for line in answer.iter_lines() if line]
    kinds = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"] and kinds[-2:] == ["message_delta",
                                                                                            "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"} and kinds[-3] == "content_block_stop"
    assert [d["type"] for d in datas] == kinds
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens" and datas[-2]["usage"]["output_tokens"] == 5


@pytest.mark.slow
def test_llm_comply_anthropic_passes_all_but_what_the_model_lacks(served: str) -> None:  # noqa: F811
    done = subprocess.run([str(BIN / "llm-comply"), "--format", "anthropic", "--base-url", f"{served}/v1",
                           "-m", "default", "-k", "none", "--auth-header", "x-api-key", "--no-bearer", "--json",
                           "-H", "anthropic-version:2023-06-01"], capture_output=True, text=True, timeout=600)
    results = {r["id"]: r for r in json.loads(done.stdout)["results"]}
    assert len(results) == 9
    for name, result in results.items():
        if name == "anth-image-input":
            assert result["status"] == "failed" and "HTTP 400" in result["errors"][0], result
        elif name in SKIPPED or name == "anth-thinking-display":
            assert result["status"] == "skipped", result
        else:
            assert result["status"] == "passed", result
