"""One request's reply, whole or streamed, holding the engine's turn (``turns.py``) while it runs.

A request asks for ``n`` choices of each of its prompts; they are generated one after another (the engine runs one
reply at a time; the second starts from the first's cached prompt). A reply is cancelled when its client goes
away, streamed or not: a reply nobody reads would hold every later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from expertswap import __version__
from expertswap.engine import Engine, TokenLogprob
from expertswap.protocol import CallReader, SamplingSettings, ToolCall

from .errors import APIError, from_exception
from .turns import Turns

T = TypeVar("T")
FINGERPRINT = f"fp_expertswap_{__version__}"


class ClientGone(APIError):
    """The client disconnected before its reply was done: the reply is cancelled, and this answer goes nowhere."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection before its reply", "client_closed")


@dataclass(frozen=True)
class Shape:
    """How a request wants its reply: chat or plain completion, calls read out of it, what is streamed."""

    model: str
    chat: bool
    stops: tuple[str, ...] = ()
    n: int = 1
    reads_calls: bool = False  # tools offered: ``<tool_call>`` blocks become ``tool_calls``
    include_usage: bool = False  # stream_options.include_usage: a last chunk of usage, ``usage: null`` before it
    logprobs: bool = False


@dataclass
class Choice:
    """One generated choice: its text as it comes, cut before the first stop sequence; its calls and logprobs."""

    index: int
    ids: list[int]
    settings: SamplingSettings
    tokens: int = 0
    cached: int = 0
    finish: str = "length"
    stop_sequence: str | None = None  # the one that ended it
    offset: int = 0  # characters of text the legacy logprobs have counted
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)


class Reply:
    """A request's generations, in OpenAI's chat or completion shape."""

    def __init__(self, engine: Engine, prompts: list[list[int]], settings: SamplingSettings, shape: Shape) -> None:
        self.engine, self.shape = engine, shape
        stops = [s for s in shape.stops if s]  # an empty stop would match everywhere and cut nothing
        self.shape = dataclasses.replace(shape, stops=tuple(stops))
        self.keep = max((len(s) - 1 for s in stops), default=0)  # text held back: a stop may be forming
        self.choices = [Choice(p * shape.n + i, ids, _seeded(settings, i)) for p, ids in enumerate(prompts)
                        for i in range(shape.n)]
        self.stop_ids = engine.stop_ids
        self.id = f"{'chatcmpl' if shape.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    async def pieces(self, choice: Choice) -> AsyncGenerator[tuple[str, list[tuple[int, TokenLogprob]]], None]:
        """The choice's text as it comes (with the logprobs of the tokens that brought it), cut before the first
        stop sequence, calls taken out when the request offered tools; closing it cancels the generation."""
        text, sent, held, cut = "", 0, [], -1
        reader = CallReader() if self.shape.reads_calls else None
        stops = self.shape.stops
        async with contextlib.aclosing(self.engine.stream_ids(choice.ids, choice.settings)) as stream:
            async for chunk in stream:
                if choice.tokens == 0:
                    choice.cached = self.engine.last_reply.cached_prompt_tokens
                choice.tokens += 1
                if chunk.logprob is not None and chunk.token_id not in self.stop_ids:  # OpenAI lists no end token
                    held.append((chunk.token_id, chunk.logprob))
                text += chunk.text
                found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
                cut, choice.stop_sequence = min(found) if found else (-1, None)
                end = cut if cut >= 0 else len(text) - self.keep
                piece = _outside_calls(reader, text[sent:end]) if end > sent else ""
                sent = max(sent, end)
                if piece or held:
                    yield piece, held
                    held = []
                if cut >= 0:
                    break
        if cut >= 0 or choice.tokens < choice.settings.max_new_tokens or self.engine.last_finish == "stop":
            choice.finish = "stop"  # a stop sequence, or the model ended its reply (at the limit too)
        rest = _outside_calls(reader, text[sent:]) if cut < 0 else ""  # the tail held back for a stop
        if reader is not None:
            rest += reader.finish()
            choice.calls = reader.calls
            if choice.calls and choice.finish == "stop":
                choice.finish = "tool_calls"
        if rest or held:
            yield rest, held

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage, over every choice (each prompt counted once); ``cached_tokens``: prompt tokens an earlier
        request's KV cache held, which did not run."""
        prompt = sum(len(c.ids) for c in self.choices if c.index % self.shape.n == 0)
        completion = sum(c.tokens for c in self.choices)
        cached = sum(c.cached for c in self.choices if c.index % self.shape.n == 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- whole ---------------------------------------------------------------------------------------------
    async def whole(self) -> dict[str, Any]:
        choices = []
        for choice in self.choices:
            text, logprobs = [], []
            async with contextlib.aclosing(self.pieces(choice)) as pieces:
                async for piece, held in pieces:
                    text.append(piece)
                    logprobs += held
            choices.append(self._whole_choice(choice, "".join(text), logprobs))
        return {"id": self.id, "object": "chat.completion" if self.shape.chat else "text_completion",
                "created": self.created, "model": self.shape.model, "system_fingerprint": FINGERPRINT,
                "choices": choices, "usage": self.usage()}

    def _whole_choice(self, choice: Choice, text: str, logprobs: list[tuple[int, TokenLogprob]]) -> dict[str, Any]:
        if not self.shape.chat:
            return {"index": choice.index, "text": text, "finish_reason": choice.finish,
                    "logprobs": self._legacy_logprobs(logprobs, choice) if self.shape.logprobs else None}
        message: dict[str, Any] = {"role": "assistant", "content": text if text.strip() or not choice.calls else None,
                                   "refusal": None, "annotations": []}
        if choice.calls:
            message["tool_calls"] = [_call(call) for call in choice.calls]
        return {"index": choice.index, "message": message, "finish_reason": choice.finish,
                "logprobs": self._chat_logprobs(logprobs)}

    # ---- streamed ------------------------------------------------------------------------------------------
    async def sse(self) -> AsyncGenerator[str, None]:
        """Chunks as OpenAI streams them, choice after choice, then usage (when asked) and ``[DONE]``. An error once
        the headers are out is an error event (OpenAI's in-stream error) before the ``[DONE]``."""
        try:
            for choice in self.choices:
                if self.shape.chat:
                    yield self._chunk(choice, {"role": "assistant", "content": ""})
                async with contextlib.aclosing(self.pieces(choice)) as pieces:
                    async for piece, held in pieces:
                        yield self._chunk(choice, {"content": piece}, held)
                if choice.calls:
                    yield self._chunk(choice, {"tool_calls": [{"index": k, **_call(c)}
                                                              for k, c in enumerate(choice.calls)]})
                yield self._chunk(choice, {}, finish=choice.finish)
            if self.shape.include_usage:
                yield self._event([], self.usage())
        except Exception as exc:
            yield f"data: {json.dumps(from_exception(exc).body())}\n\n"
        yield "data: [DONE]\n\n"

    def _chunk(self, choice: Choice, delta: dict[str, Any], held: list[tuple[int, TokenLogprob]] | None = None,
               finish: str | None = None) -> str:
        if not self.shape.chat:
            body = {"index": choice.index, "text": delta.get("content", ""), "finish_reason": finish,
                    "logprobs": self._legacy_logprobs(held or [], choice) if self.shape.logprobs else None}
            return self._event([body])
        logprobs = self._chat_logprobs(held or []) if held else None
        return self._event([{"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.shape.chat
                                else "text_completion", "created": self.created, "model": self.shape.model,
                                "system_fingerprint": FINGERPRINT, "choices": choices}
        if self.shape.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    # ---- log-probabilities ---------------------------------------------------------------------------------
    def _chat_logprobs(self, held: list[tuple[int, TokenLogprob]]) -> dict[str, Any] | None:
        """``{"content": [...], "refusal": None}``: each token's text, log-probability, UTF-8 bytes and rivals."""
        if not self.shape.logprobs:
            return None
        ids = [t for t, _ in held] + [i for _, lp in held for i, _ in lp.top]
        texts, raw = self._texts(ids), dict(zip(ids, self.engine.token_bytes(ids), strict=True))

        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": texts[token], "logprob": logprob, "bytes": list(raw[token])}

        return {"content": [{**entry(token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for token, lp in held], "refusal": None}

    def _legacy_logprobs(self, held: list[tuple[int, TokenLogprob]], choice: Choice) -> dict[str, Any]:
        """The completions API's form: parallel lists of tokens, their log-probabilities and top alternatives;
        offsets count from the start of the choice's text, across a stream's chunks."""
        texts = self._texts([t for t, _ in held] + [i for _, lp in held for i, _ in lp.top])
        offsets = []
        for token, _ in held:
            offsets.append(choice.offset)
            choice.offset += len(texts[token])
        return {"tokens": [texts[t] for t, _ in held], "token_logprobs": [lp.logprob for _, lp in held],
                "top_logprobs": [{texts[i]: v for i, v in lp.top} for _, lp in held], "text_offset": offsets}

    def _texts(self, ids: list[int]) -> dict[int, str]:
        return dict(zip(ids, self.engine.token_texts(ids), strict=True))


def _seeded(settings: SamplingSettings, i: int) -> SamplingSettings:
    """The ``i``-th choice's settings: a seeded request gives each choice a seed of its own, repeatably."""
    return settings if settings.seed is None or i == 0 else dataclasses.replace(settings, seed=settings.seed + i)


def _outside_calls(reader: CallReader | None, text: str) -> str:
    return text if reader is None else reader.feed(text)


def _call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


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
