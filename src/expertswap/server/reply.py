"""One request's reply, whole or streamed, holding the engine's turn (``turns.py``) while it runs.

A reply is cancelled when its client goes away, streamed or not: the engine answers one request at a time, and a
reply nobody reads would hold every later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings

from .errors import APIError, from_exception
from .turns import Turns

T = TypeVar("T")


class ClientGone(APIError):
    """The client disconnected before its reply was done: the reply is cancelled, and this answer goes nowhere."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection before its reply", "client_closed")


class Reply:
    """One request's generation: stop sequences cut the text, and the finish reason and usage follow it."""

    def __init__(self, engine: Engine, ids: list[int], settings: SamplingSettings, stops: list[str], model: str,
                 chat: bool) -> None:
        self.engine, self.ids, self.settings, self.model, self.chat = engine, ids, settings, model, chat
        self.stops = [s for s in stops if s]  # an empty stop would match everywhere and cut nothing
        self.keep = max((len(s) - 1 for s in self.stops), default=0)  # text held back: a stop may be forming
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.tokens = 0
        self.finish = "length"

    async def pieces(self) -> AsyncGenerator[str, None]:
        """The reply's text as it comes, cut before the first stop sequence; closing it cancels the generation."""
        text, sent = "", 0
        async with contextlib.aclosing(self.engine.stream_ids(self.ids, self.settings)) as stream:
            async for chunk in stream:
                self.tokens += 1
                text += chunk.text
                cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    self.finish = "stop"
                    return
                if len(text) - self.keep > sent:
                    yield text[sent : len(text) - self.keep]
                    sent = len(text) - self.keep
        if self.tokens < self.settings.max_new_tokens:
            self.finish = "stop"  # the model ended its reply
        if len(text) > sent:
            yield text[sent:]

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage; ``cached_tokens``: the prompt's tokens an earlier request's KV cache held (not run)."""
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.tokens,
                "total_tokens": len(self.ids) + self.tokens,
                "prompt_tokens_details": {"cached_tokens": self.engine.last_reply.cached_prompt_tokens}}

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if delta:
            return {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    def _object(self, chunk: bool) -> str:
        return ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")

    def _event(self, choice: dict[str, Any], usage: bool = False) -> str:
        body = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
                "choices": [choice]}
        if usage:
            body["usage"] = self.usage()
        return f"data: {json.dumps(body)}\n\n"

    async def whole(self) -> dict[str, Any]:
        async with contextlib.aclosing(self.pieces()) as pieces:
            text = "".join([piece async for piece in pieces])
        return {"id": self.id, "object": self._object(False), "created": self.created, "model": self.model,
                "choices": [self._choice(text, self.finish, delta=False)], "usage": self.usage()}

    async def sse(self) -> AsyncGenerator[str, None]:
        """Chunks as OpenAI streams them, then ``[DONE]``. An error once the headers are out is an error event
        (OpenAI's in-stream error) before the ``[DONE]``: the stream still ends as a stream should."""
        try:
            if self.chat:
                yield self._event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async with contextlib.aclosing(self.pieces()) as pieces:
                async for piece in pieces:
                    yield self._event(self._choice(piece, None, delta=True))
            yield self._event(self._choice(None, self.finish, delta=True), usage=True)
        except Exception as exc:
            yield f"data: {json.dumps(from_exception(exc).body())}\n\n"
        yield "data: [DONE]\n\n"


class ReplyStream(StreamingResponse):
    """A reply's events, holding the engine's turn until the response ends, however it ends.

    It watches for the disconnect itself: Starlette's watcher cancels the stream in an anyio cancel scope, which
    cancels every later ``await`` too, so the engine's stream could not wait for its worker to stop before the
    turn went to the next request. And cut before its first event, the events' generator never starts, so its
    own ``finally`` would never run: the turn is given back here.
    """

    def __init__(self, reply: Reply, turns: Turns) -> None:
        self.events = reply.sse()
        self.turns = turns
        super().__init__(self.events, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientGone):
                await unless_disconnected(receive, self.stream_response(send))
        finally:
            await self.events.aclose()
            self.turns.give_back()


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result; when the client disconnects first, ``work`` is cancelled (once) and awaited, so that its
    engine stream has closed, and the engine is free, by the time ``ClientGone`` is raised."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # no-op once done
        gone.cancel()
        await asyncio.wait((task, gone))
    if task.cancelled():
        raise ClientGone
    return task.result()
