"""A chat request as the engine takes it: the conversation for the chat template, the tools, and what the reply
must be (a tool call, JSON, JSON of a schema), as a grammar for the sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from expertswap.protocol import MAX_CALLS, Constraint, call_grammar, for_template, speaks_tools

from .errors import APIError
from .schemas import ChatRequest, NamedToolChoice, UnsupportedPart


@dataclass(frozen=True)
class ChatTurn:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # for a template that renders them itself
    constraint: Constraint | None
    reads_calls: bool  # tools were offered: the reply's calls are read out of it


def chat_turn(body: ChatRequest, template: str | None) -> ChatTurn:
    """``body``'s conversation and constraint; content the model cannot read (an image) is a 400."""
    messages = []
    for n, message in enumerate(body.messages):
        try:
            text = message.text()
        except UnsupportedPart as exc:
            raise APIError(400, str(exc), param=f"messages.{n}.content") from None
        turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": text}
        if message.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                                  for c in message.tool_calls]
        if message.tool_call_id:
            turn["tool_call_id"] = message.tool_call_id
        messages.append(turn)
    offered = [t.function.model_dump(exclude_none=True) for t in body.tools or []] if body.tool_choice != "none" \
        else []
    named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
    must_call = body.tool_choice == "required" or named is not None
    wants_json = body.response_format is not None and body.response_format.type != "text"
    if must_call and wants_json:
        raise APIError(400, "a required tool call and a JSON response_format cannot both shape one reply",
                       param="response_format")
    calls = Calls(must_call, named, bool(body.parallel_tool_calls))
    return prepared(messages, offered, template, calls, None if must_call else _format(body))


@dataclass(frozen=True)
class Calls:
    """What the request asks of the reply's calls: that it make one (of ``named``), and whether several."""

    required: bool = False
    named: str | None = None
    parallel: bool = False


def prepared(messages: list[dict[str, Any]], offered: list[dict[str, Any]], template: str | None, calls: Calls,
             constraint: Constraint | None) -> ChatTurn:
    """A conversation (OpenAI's turns, already text) and its offered tools, as the engine takes them: a required
    call becomes the grammar the sampler keeps to."""
    rendered, tools = for_template(messages, offered, speaks_tools(template))
    if calls.required and offered:
        constraint = Constraint("lark", call_grammar(offered, calls.named, most=MAX_CALLS if calls.parallel else 1))
    return ChatTurn(rendered, tools, constraint, reads_calls=bool(offered))


def _format(body: ChatRequest) -> Constraint | None:
    """The response format as the grammar the sampler keeps to."""
    if body.response_format is None or body.response_format.type == "text":
        return None
    if body.response_format.type == "json_object":
        return Constraint("json")
    assert body.response_format.json_schema is not None  # the schema's validator saw to it
    return Constraint("json_schema", json.dumps(body.response_format.json_schema.schema_))
