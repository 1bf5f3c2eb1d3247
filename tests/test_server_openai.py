"""The OpenAI schema in full, on the wire: every response checked against OpenAI's own OpenAPI spec (as llm-comply
ships it), content parts, the developer role, tool calls, structured output, logprobs, ``n``, penalties, usage
as ``stream_options`` asks, and every field the server does not implement refused by name."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import llm_comply
import openai
import pytest
from llm_comply.schema import SpecLoader

from expertswap.engine import Engine
from expertswap.protocol import MAX_CALLS, SamplingSettings
from expertswap.server import BackgroundServer

from .test_server import KEY, MESSAGES, Server


def _spec() -> SpecLoader:
    """OpenAI's spec as llm-comply ships it, with OpenAPI 3.0's ``nullable`` honoured on enums too (a streamed
    chunk's ``finish_reason`` is null until the last)."""
    spec = json.loads((Path(llm_comply.__file__).parent / "specs" / "openai_chat.json").read_text())

    def nullable_enums(node: object) -> None:
        if isinstance(node, dict):
            if node.get("nullable") and isinstance(node.get("enum"), list):
                node["enum"] = [*node["enum"], None]
            for value in node.values():
                nullable_enums(value)
        elif isinstance(node, list):
            for value in node:
                nullable_enums(value)

    nullable_enums(spec)
    path = Path(tempfile.mkdtemp()) / "openai_chat.json"
    path.write_text(json.dumps(spec))
    return SpecLoader(str(path))


SPEC = _spec()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


@pytest.fixture
def server(tiny_model, open_engine) -> Iterator[Server]:
    running = Server(open_engine(tiny_model("qwen3_moe"), budget="50%"))
    yield running
    running.stop()


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _events(server: Server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/{path}", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_responses_and_chunks_match_openais_schema(server: Server) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    whole = _post(server, "chat/completions", body).json()
    assert SPEC.validate(whole, "CreateChatCompletionResponse") == []
    message = whole["choices"][0]["message"]
    assert message["refusal"] is None and message["annotations"] == [] and whole["choices"][0]["logprobs"] is None
    assert whole["system_fingerprint"].startswith("fp_expertswap")
    chunks = _events(server, "chat/completions", body)
    for chunk in chunks:
        assert SPEC.validate(chunk, "CreateChatCompletionStreamResponse") == [], chunk
        assert "usage" not in chunk  # not asked for (stream_options)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]


def test_usage_streams_only_as_stream_options_asks_in_a_chunk_of_its_own(server: Server) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0,
            "stream_options": {"include_usage": True}}
    chunks = _events(server, "chat/completions", body)
    *replies, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None and c["choices"] for c in replies)
    assert _post(server, "chat/completions", {**body, "stream": False}).status_code == 400  # options need a stream


def test_text_parts_and_the_developer_role_read_as_a_string_and_a_system_turn(server: Server) -> None:
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Tell me "},
                                          {"type": "text", "text": "about the sea."}]}]
    client = server.client()
    one, two = (client.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0)
                for m in (plain, parts))
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.usage.prompt_tokens == two.usage.prompt_tokens


def test_an_image_is_refused_with_words_and_nothing_runs(server: Server) -> None:
    before = server.engine.stats().tokens_generated
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    answer = _post(server, "chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "text only" in error["message"] and error["param"] == "messages.0.content"
    assert server.engine.stats().tokens_generated == before


def test_a_field_the_server_does_not_implement_is_refused_by_name_bookkeeping_is_accepted(server: Server) -> None:
    base = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    for field, value in (("junk", 1), ("audio", {"voice": "alloy"}), ("modalities", ["text"]),
                         ("reasoning_effort", "low"), ("functions", [])):
        answer = _post(server, "chat/completions", {**base, field: value})
        assert answer.status_code == 400, field
        assert answer.json()["error"]["param"] == field and "does not implement" in answer.json()["error"]["message"]
    answer = _post(server, "completions", {"model": "tiny", "prompt": "x", "echo": True})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "echo"
    accepted = {**base, "user": "u1", "store": False, "metadata": {"k": "v"}, "parallel_tool_calls": True,
                "service_tier": "auto"}
    assert _post(server, "chat/completions", accepted).status_code == 200
    nulls = {**base, "temperature": None, "top_p": None, "n": None, "stop": None, "tools": None, "seed": None}
    assert _post(server, "chat/completions", nulls).status_code == 200  # null: the field left out, as OpenAI's


def test_n_choices_each_a_reply_seeded_apart_and_capped(server: Server) -> None:
    client = server.client()
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 12 and greedy.usage.prompt_tokens < greedy.usage.total_tokens - 6
    sampled = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                             seed=5, n=3)
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                           seed=5, n=3)
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1  # repeatable, not alike
    chunks = _events(server, "chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "n": 2,
                                                  "temperature": 0})
    assert sorted({c["choices"][0]["index"] for c in chunks}) == [0, 1]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=5)


def test_logprobs_on_the_wire_as_openai_shapes_them(server: Server) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = _post(server, "chat/completions", body).json()
    assert SPEC.validate(whole, "CreateChatCompletionResponse") == []
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] <= 0
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the pick is the likeliest
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert bytes(entry["bytes"]).decode() == entry["token"]
    streamed = [e for c in _events(server, "chat/completions", body) for e in
                ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert _post(server, "chat/completions", {**body, "logprobs": False}).status_code == 400  # top needs logprobs


def test_penalties_and_logit_bias_change_the_reply(server: Server, tiny_model) -> None:
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=False) as engine:
        first = next(engine.generate(engine.encode_chat(MESSAGES), SamplingSettings(max_new_tokens=1)))
        want = engine.decode(list(engine.generate(engine.encode_chat(MESSAGES), SamplingSettings(
            max_new_tokens=8, presence_penalty=2.0, frequency_penalty=1.0, logit_bias=((first, -100.0),)))))
    shaped = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                            presence_penalty=2.0, frequency_penalty=1.0,
                                            logit_bias={str(first): -100})
    assert shaped.choices[0].message.content == want != plain.choices[0].message.content


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"],
          "properties": {"answer": {"type": "string", "maxLength": 10}, "sure": {"type": "boolean"}}}


def test_json_schema_output_always_parses_and_matches(server: Server) -> None:
    client = server.client()
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=80, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA,
                                                                     "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    bad = _post(server, "chat/completions", {"model": "tiny", "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_json_object_mode_gives_an_object(server: Server) -> None:
    reply = _post(server, "chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 400,
                                               "temperature": 0, "response_format": {"type": "json_object"}}).json()
    text, finish = reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]
    assert text.startswith("{")
    if finish == "stop":  # a random model may write one long string past the limit; a whole reply parses
        assert isinstance(json.loads(text), dict)


def test_a_required_tool_call_is_always_valid_and_finishes_as_tool_calls(server: Server) -> None:
    client = server.client()
    for seed in range(3):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                               tools=[WEATHER, TIME], tool_choice="required", max_tokens=400,
                                               temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
            jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
            assert call.id.startswith("call_") and call.type == "function"
        assert SPEC.validate(reply.model_dump(exclude_unset=True), "CreateChatCompletionResponse") == []
    named = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Time?"}],
                                           tools=[WEATHER, TIME], max_tokens=400,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert {c.function.name for c in named.choices[0].message.tool_calls} == {"get_time"}


def test_a_call_takes_only_the_parameters_its_function_names_and_one_call_unless_parallel(server: Server) -> None:
    """A schema that does not close its objects (most clients send none) still gets calls of its own properties,
    as OpenAI's are; several calls in one reply only when the request allows parallel calls."""
    open_schema = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "required": ["term"], "properties": {"term": {"type": "string", "maxLength": 8}}}}}
    client = server.client()
    counts = set()
    for seed in range(4):
        for parallel in (None, True):
            extra = {} if parallel is None else {"parallel_tool_calls": parallel}
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Look up"}],
                                                   tools=[open_schema], tool_choice="required", max_tokens=400,
                                                   temperature=1.0, seed=seed, **extra)
            calls = reply.choices[0].message.tool_calls
            assert all(set(json.loads(c.function.arguments)) == {"term"} for c in calls)
            assert len(calls) == 1 if parallel is None else 1 <= len(calls) <= MAX_CALLS
            counts.add(len(calls))
    assert max(counts) > 1  # a random model asked for parallel calls makes some


def test_tool_calls_stream_and_a_tool_result_continues_the_chat(server: Server) -> None:
    client = server.client()
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], tool_choice="required", max_tokens=400, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            calls.setdefault(delta.index, [delta.id, delta.function.name, ""])[2] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    call_id, name, arguments = calls[0]
    assert name == "get_weather" and "city" in json.loads(arguments)
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
               {"role": "tool", "tool_call_id": call_id, "content": '{"celsius": 21}'}]
    after = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=6)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                          max_tokens=6)
    assert none.choices[0].message.tool_calls is None
    orphan = _post(server, "chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]})
    assert orphan.status_code == 400 and "tool_call_id" in orphan.json()["error"]["message"]


def test_completions_take_lists_of_prompts_and_token_ids_and_give_legacy_logprobs(server: Server) -> None:
    client = server.client()
    both = client.completions.create(model="tiny", prompt=["The sea is", "A cat"], max_tokens=4, temperature=0)
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
              for p in ("The sea is", "A cat")]
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == single
    ids = server.engine.encode("The sea is")
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0).choices[0].text == \
        single[0]
    legacy = _post(server, "completions", {"model": "tiny", "prompt": "The sea is", "max_tokens": 3,
                                           "temperature": 0, "logprobs": 2}).json()
    assert SPEC.validate(legacy, "CreateCompletionResponse") == []
    logprobs = legacy["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 3
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    outside = _post(server, "completions", {"model": "tiny", "prompt": [server.engine.vocab_size]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "prompt"


def test_a_server_started_with_a_seed_samples_unseeded_requests_reproducibly(tiny_model, open_engine) -> None:
    """``expertswap serve --seed N``: requests without a seed draw N, N+1, ... in order, so two servers started
    alike answer alike (llama.cpp's ``--seed``); without it, each request samples afresh."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0}
    answers = []
    for _ in range(2):
        server = BackgroundServer(open_engine(tiny_model("qwen3_moe"), budget="100%"), "tiny", port=0, seed=7)
        try:
            answers.append([httpx.post(f"{server.url}/chat/completions", json=body, timeout=60).json()["choices"][0]
                            ["message"]["content"] for _ in range(3)])
        finally:
            server.stop()
    assert answers[0] == answers[1] and len(set(answers[0])) > 1  # alike across servers, apart across requests


NATIVE = ("{%- if tools %}<|system|>\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\nCall as "
          "<tool_call>{...}</tool_call><|end|>\n{% endif %}"
          "{%- for m in messages %}"
          "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>\n{% for c in m.tool_calls %}<tool_call>"
          "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}<|end|>\n"
          "{%- elif m.role == 'tool' %}<|user|>\n<tool_response>{{ m.content }}</tool_response><|end|>\n"
          "{%- else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_a_template_that_speaks_tools_renders_them_itself_with_parsed_arguments(server: Server,
                                                                               monkeypatch) -> None:
    """Qwen-style templates take ``tools=`` and calls whose arguments are objects; other templates are told of the
    tools in a system turn this server writes (``tools_prompt``), which must not appear here."""
    engine = server.engine
    monkeypatch.setattr(engine.tokenizer, "chat_template", NATIVE)
    prompts: list[str] = []
    encode = engine.encode_chat
    monkeypatch.setattr(engine, "encode_chat", lambda m, t=None: (ids := encode(m, t), prompts.append(
        engine.tokenizer.decode(ids)))[0])
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    answer = _post(server, "chat/completions", {"model": "tiny", "messages": history, "tools": [WEATHER],
                                                "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    prompt = prompts[-1]
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in prompt and "You may call" not in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<tool_response>21 C</tool_response>" in prompt


def test_calls_are_read_out_of_a_stream_however_it_is_cut_and_text_around_them_passes() -> None:
    from expertswap.protocol import CallReader, for_template

    reply = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> '
             "<tool_call>not json</tool_call> done <tool")
    for size in (1, 3, 7, len(reply)):
        reader, text = CallReader(), []
        for start in range(0, len(reply), size):
            text.append(reader.feed(reply[start : start + size]))
        text.append(reader.finish())
        assert "".join(text) == "Let me check.  <tool_call>not json</tool_call> done <tool", size
        assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == [("get_weather", {"city": "Oslo"})]
    folded, tools = for_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                 [WEATHER["function"]], native=False)
    assert tools is None and folded[0]["content"].startswith("Be brief.\n\nYou may call")
    assert '"name": "get_weather"' in folded[0]["content"] and folded[1] == {"role": "user", "content": "Hi"}


def test_the_async_client_streams_tool_calls_json_and_logprobs(server: Server) -> None:
    import asyncio

    async def run() -> tuple[list, str, list]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0) as client:
            calls: list = []
            async for chunk in await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                    tool_choice="required", max_tokens=400, stream=True):
                calls += chunk.choices[0].delta.tool_calls or [] if chunk.choices else []
            text = ""
            async for chunk in await client.chat.completions.create(
                    model="tiny", messages=MESSAGES, max_tokens=80, stream=True, response_format={
                        "type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            whole = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3,
                                                         temperature=0, logprobs=True, top_logprobs=1)
            return calls, text, whole.choices[0].logprobs.content

    calls, text, logprobs = asyncio.run(run())
    assert [c.function.name for c in calls] == ["get_weather"] and "city" in json.loads(calls[0].function.arguments)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert len(logprobs) == 3 and all(len(e.top_logprobs) == 1 for e in logprobs)


def test_tool_schemas_with_references_and_all_of_give_valid_calls(server: Server) -> None:
    """Pydantic writes ``$defs`` and ``$ref``; a call's grammar keeps them pointing where they went, and leaves an
    ``allOf``'s parts open (each closed would refuse the others' properties)."""
    where = {"type": "function", "function": {"name": "where", "parameters": {
        "type": "object", "required": ["place"], "properties": {"place": {"$ref": "#/$defs/Place"}},
        "$defs": {"Place": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "maxLength": 8}}}}}}}
    both = {"type": "function", "function": {"name": "both", "parameters": {"allOf": [
        {"type": "object", "required": ["a"], "properties": {"a": {"enum": ["x", "y"]}}},
        {"type": "object", "required": ["b"], "properties": {"b": {"type": "boolean"}}}]}}}
    client = server.client()
    for tool in (where, both):
        for seed in range(2):
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go"}],
                                                   tools=[tool], tool_choice="required", max_tokens=400,
                                                   temperature=1.0, seed=seed)
            call = reply.choices[0].message.tool_calls[0]
            resolved = {**tool["function"]["parameters"]}
            jsonschema.validate(json.loads(call.function.arguments), resolved)


def test_what_the_engine_would_refuse_is_a_400_before_a_stream_opens_and_requests_are_bounded(server: Server) -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    for body in ({"response_format": bad_schema}, {"logit_bias": {str(server.engine.vocab_size): 1}}):
        answer = _post(server, "chat/completions", {"model": "tiny", "messages": MESSAGES, "stream": True, **body})
        assert answer.status_code == 400 and answer.json()["error"]["message"], body
    many = _post(server, "chat/completions", {"model": "tiny", "messages": MESSAGES,
                                              "logit_bias": {str(i): 1 for i in range(2000)}})
    assert many.status_code == 400 and many.json()["error"]["param"] == "logit_bias"
    prompts = _post(server, "completions", {"model": "tiny", "prompt": ["a"] * 5, "n": 4})
    assert prompts.status_code == 400 and "at most 16" in prompts.json()["error"]["message"]
    cold = _post(server, "chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 3,
                                              "temperature": 1e-39})
    assert cold.status_code == 200  # as good as greedy, and no overflow


def test_a_call_whose_arguments_are_not_an_object_stays_text() -> None:
    from expertswap.protocol import CallReader

    reader = CallReader()
    text = reader.feed('<tool_call>{"name": "f", "arguments": "city=Paris"}</tool_call>') + reader.finish()
    assert not reader.calls and text == '<tool_call>{"name": "f", "arguments": "city=Paris"}</tool_call>'
    reader.feed('<tool_call>{"name": "f", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>')
    assert [json.loads(c.arguments) for c in reader.calls] == [{"city": "Paris"}]  # JSON text of an object


def test_a_request_without_a_limit_replies_until_the_context_is_full(server: Server) -> None:
    """No ``max_tokens``: OpenAI's, llama.cpp's and vLLM's servers reply until the model ends or the context is
    full, not to a cap of the server's own."""
    engine = server.engine
    ids = (engine.encode("The sea is wide and deep. ") * engine.context_tokens)[: engine.context_tokens - 300]
    answer = _post(server, "completions", {"model": "tiny", "prompt": ids, "temperature": 0}).json()
    choice, usage = answer["choices"][0], answer["usage"]
    assert usage["completion_tokens"] > 256 or choice["finish_reason"] == "stop"
    assert usage["total_tokens"] <= engine.context_tokens
    assert (choice["finish_reason"] == "length") == (usage["total_tokens"] == engine.context_tokens)


def test_logprob_bytes_are_each_tokens_own_even_inside_a_character(server: Server) -> None:
    """An emoji split over tokens: each token's ``bytes`` is its part, and the parts make the character."""
    engine = server.engine
    ids = engine.encode("é😀 sea")
    parts = engine.token_bytes(ids)
    assert b"".join(parts).decode() == "é😀 sea" and any(not _decodes(p) for p in parts)


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
