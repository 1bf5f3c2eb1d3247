"""Anthropic's Messages API over the same engine and queue: ``POST /v1/messages`` (streamed or not, tools
included) and ``/v1/messages/count_tokens``, so that Claude-style clients and agents work too.

A request becomes the same conversation and constraint an OpenAI chat request does (``chat_turn.prepared``), and
its reply comes from the same generation (``Reply.pieces``), shaped as Anthropic's ``message`` and events.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request

from expertswap.engine import Engine
from expertswap.protocol import Constraint, SamplingSettings

from .anthropic_schemas import CountRequest, MediaBlock, MessagesRequest, TextBlock, ToolResultBlock, ToolUseBlock
from .chat_turn import Calls, ChatTurn, prepared
from .errors import APIError, from_exception
from .openai_routes import Replies
from .reply import Choice, Reply, Shape

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_turn(body: MessagesRequest | CountRequest, template: str | None) -> ChatTurn:
    """The request's system prompt, turns and tools as an OpenAI chat's: a tool result is a tool turn, a
    ``tool_use`` block a call; an image or document is a 400."""
    messages: list[dict[str, Any]] = []
    system = body.system if isinstance(body.system, str) else "".join(b.text for b in body.system or [])
    if system:
        messages.append({"role": "system", "content": system})
    for n, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        text, calls = [], []
        for block in message.content:
            if isinstance(block, MediaBlock) or (isinstance(block, ToolResultBlock) and not isinstance(
                    block.content, str) and any(isinstance(b, MediaBlock) for b in block.content)):
                raise APIError(400, "this model reads text only: image and document blocks are not supported",
                               param=f"messages.{n}.content")
            if isinstance(block, TextBlock):
                text.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append({"id": block.id, "name": block.name, "arguments": json.dumps(block.input)})
            else:
                result = block.content if isinstance(block.content, str) else \
                    "".join(b.text for b in block.content if isinstance(b, TextBlock))
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        if message.role == "assistant" or text:
            messages.append({"role": message.role, "content": "".join(text), **({"tool_calls": calls} if calls
                                                                                  else {})})
    choice = body.tool_choice
    offered = [] if choice is not None and choice.type == "none" else [
        {"name": t.name, "description": t.description, "parameters": t.input_schema} if t.description else
        {"name": t.name, "parameters": t.input_schema} for t in body.tools or []]
    if choice is not None and choice.type == "tool" and choice.name not in {t["name"] for t in offered}:
        raise APIError(400, f"tool_choice names {choice.name!r}, which is not among the tools", param="tool_choice")
    calls_asked = Calls(required=choice is not None and choice.type in ("any", "tool"),
                        named=choice.name if choice is not None and choice.type == "tool" else None,
                        parallel=choice is not None and choice.disable_parallel_tool_use is False)
    output = body.output_config.format if isinstance(body, MessagesRequest) and body.output_config else None
    if output is not None and calls_asked.required:
        raise APIError(400, "a required tool call and an output format cannot both shape one reply",
                       param="output_config")
    constraint = Constraint("json_schema", json.dumps(output.schema_)) if output is not None else None
    return prepared(messages, offered, template, calls_asked, constraint)


class AnthropicReply(Reply):
    """The reply as Anthropic's ``message``, or its event stream."""

    def __init__(self, engine: Engine, prompts: list[list[int]], settings: SamplingSettings, shape: Shape) -> None:
        super().__init__(engine, prompts, settings, shape)
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def usage(self) -> dict[str, Any]:
        """Anthropic's usage, every field the spec requires: input tokens that ran, those a kept cache held."""
        choice = self.choices[0]
        return {"input_tokens": len(choice.ids) - choice.cached, "output_tokens": choice.tokens,
                "cache_read_input_tokens": choice.cached, "cache_creation_input_tokens": 0, "cache_creation": None,
                "inference_geo": None, "output_tokens_details": None, "server_tool_use": None,
                "service_tier": "standard"}

    def _stop(self, choice: Choice) -> dict[str, Any]:
        reason = "stop_sequence" if choice.stop_sequence else STOP_REASONS.get(choice.finish, "end_turn")
        return {"stop_reason": reason, "stop_sequence": choice.stop_sequence, "stop_details": None}

    def _start(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.shape.model, "content": [],
                "container": None}

    async def whole(self) -> dict[str, Any]:
        choice, text = self.choices[0], []
        async with contextlib.aclosing(self.pieces(choice)) as pieces:
            async for piece, _held in pieces:
                text.append(piece)
        whole = "".join(text)
        shown = whole.strip() or (whole and not choice.calls)  # the newline between calls is no text block
        content: list[dict[str, Any]] = [{"type": "text", "text": whole, "citations": None}] if shown else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments),
                     "caller": {"type": "direct"}} for c in choice.calls]
        return {**self._start(), "content": content, **self._stop(choice), "usage": self.usage()}

    async def sse(self) -> AsyncGenerator[str, None]:
        """``message_start``, a text block's deltas, a block per tool call, ``message_delta`` with the stop reason
        and usage, ``message_stop``; an error after the headers is an ``error`` event."""
        choice, index = self.choices[0], 0
        try:
            yield _event("message_start", {"message": {**self._start(), "stop_reason": None, "stop_sequence": None,
                                                       "stop_details": None, "usage": {
                                                           **self.usage(), "input_tokens": len(choice.ids)}}})
            yield _event("ping", {})
            opened = False
            async with contextlib.aclosing(self.pieces(choice)) as pieces:
                async for piece, _held in pieces:
                    if piece and not opened:
                        yield _event("content_block_start", {"index": 0, "content_block": {
                            "type": "text", "text": "", "citations": None}})
                        opened = True
                    if piece:
                        yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                                   "text": piece}})
            if opened:
                yield _event("content_block_stop", {"index": 0})
                index = 1
            for call in choice.calls:
                yield _event("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": call.id, "name": call.name, "input": {}, "caller": {"type": "direct"}}})
                yield _event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                               "partial_json": call.arguments}})
                yield _event("content_block_stop", {"index": index})
                index += 1
            yield _event("message_delta", {"delta": self._stop(choice), "usage": self.usage()})
            yield _event("message_stop", {})
        except Exception as exc:
            yield _event("error", {"error": from_exception(exc).anthropic_body()["error"]})


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


def router(replies: Replies) -> APIRouter:
    """``/v1/messages`` and ``/v1/messages/count_tokens``, answered by ``replies`` in their queue."""
    routes = APIRouter()
    engine = replies.engine

    @routes.post("/v1/messages", response_model=None)
    async def messages(body: MessagesRequest, request: Request) -> Any:
        turn = anthropic_turn(body, engine.chat_template)
        settings = SamplingSettings(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, constraint=turn.constraint)
        shape = Shape(replies.model, chat=True, stops=tuple(body.stop_sequences or ()), reads_calls=turn.reads_calls)
        chars = sum(len(m.get("content") or "") for m in turn.messages)
        reply = await replies.prepare(body.model, chars, lambda: [engine.encode_chat(turn.messages, turn.tools)],
                                      request, shape, settings, AnthropicReply)
        return await replies.answer(reply, body.stream, request)

    @routes.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountRequest) -> dict[str, int]:
        replies.require_model(body.model)
        turn = anthropic_turn(body, engine.chat_template)
        return {"input_tokens": len(await replies.encode_now(lambda: engine.encode_chat(turn.messages, turn.tools),
                                                              "messages"))}

    return routes

