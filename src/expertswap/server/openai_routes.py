"""OpenAI's API over one engine: the model list, chat and plain completions, streamed or not.

A request is checked where that is cheap (the model's name, the prompt's length in characters), then waits for
the engine's turn (``turns.py``), is encoded in that turn on a worker thread, and is answered by a ``Reply``
(``reply.py``). A client that disconnects before its reply starts gives its place in the queue up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request

from expertswap.engine import Engine
from expertswap.protocol import Constraint, ExpertSwapError, SamplingSettings

from .chat_turn import chat_turn
from .errors import APIError
from .reply import Reply, ReplyStream, Shape, unless_disconnected
from .schemas import ChatRequest, CompletionRequest, Sampling
from .turns import Turns

CHARS_PER_TOKEN = 64  # more than any tokenizer packs in one token: a longer prompt cannot fit, and is not encoded
UNTIL_CONTEXT = 2**31 - 1  # a request that sets no limit replies until it ends or the context does, as OpenAI's
NO_CONTEXT_LIMIT = 4096  # ... or, for a model whose context is not known, this many tokens


class Replies:
    """The completions of ``engine``, which the API calls ``model``: one at a time, in ``turns``."""

    def __init__(self, engine: Engine, model: str, turns: Turns, seed: int | None = None) -> None:
        self.engine, self.model, self.turns = engine, model, turns
        self.seeds = itertools.count(seed) if seed is not None else None  # for requests that set none
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertswap-encode")

    def close(self) -> None:
        self.encoder.shutdown()

    def require_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"model {name!r} does not exist: this server has {self.model!r}", param="model")

    async def prepare(self, model: str, chars: int, encode: Callable[[], list[list[int]]], request: Request,
                      shape: Shape, settings: SamplingSettings, kind: type[Reply] = Reply) -> Reply:
        """Check what is cheap to check, wait for the engine's turn and encode the prompts in it: the reply, of
        ``kind`` (OpenAI's or Anthropic's shape), holding the turn. A client that disconnects first gives its
        place in the queue up."""
        self.require_model(model)
        field = "messages" if shape.chat else "prompt"
        context = self.engine.context_tokens
        if context is not None and chars > CHARS_PER_TOKEN * context:
            raise APIError(413, f"the prompt has {chars} characters: more than this model's context of {context} "
                                "tokens can hold", param=field)
        return await unless_disconnected(request.receive, self._in_turn(encode, field, shape, settings, kind))

    async def answer(self, reply: Reply, stream: bool, request: Request) -> Any:
        """The reply whole, or streamed; the turn is given back when it is done, however it ends."""
        if stream:
            return ReplyStream(reply, self.turns)  # holds the turn, given back when its response ends
        try:
            return await unless_disconnected(request.receive, reply.whole())
        finally:
            self.turns.give_back()

    async def encode_now(self, encode: Callable[[], list[int]], field: str) -> list[int]:
        """One prompt's ids without waiting for a turn (counting tokens runs no reply)."""
        return (await self._encoded(lambda: [encode()], field))[0]

    async def _in_turn(self, encode: Callable[[], list[list[int]]], field: str, shape: Shape,
                       settings: SamplingSettings, kind: type[Reply]) -> Reply:
        """Take the engine's turn, then encode the prompts: a full queue is refused before anything is encoded,
        and prompts are encoded one at a time (issue 27: each can be 8 MiB). The turn is given back if no reply
        comes of it."""
        await self.turns.take()
        try:
            prompts = await self._encoded(encode, field)
            # a grammar or bias the engine would refuse is a 400 here, before a stream's headers go out
            await asyncio.get_running_loop().run_in_executor(self.encoder, self.engine.check_settings, settings)
            longest = max(len(ids) for ids in prompts)
            if settings.seed is None and self.seeds is not None:  # in the order requests run: reproducible
                settings = dataclasses.replace(settings, seed=next(self.seeds))
            return kind(self.engine, prompts, self._limited(settings, longest), shape)
        except BaseException:  # a refused prompt, or the client gone (cancelled)
            self.turns.give_back()
            raise

    async def _encoded(self, encode: Callable[[], list[list[int]]], field: str) -> list[list[int]]:
        """The prompts' ids, encoded on ``encoder``'s one thread (off the event loop): an encode that outlives
        its request, whose client left, still finishes before the next one starts."""
        try:
            prompts = await asyncio.get_running_loop().run_in_executor(self.encoder, encode)
        except ExpertSwapError as exc:  # not text, or a chat template that refuses these messages
            raise APIError(400, str(exc), param=field) from None
        context, vocab = self.engine.context_tokens, self.engine.vocab_size
        for ids in prompts:
            if context is not None and len(ids) >= context:  # the engine refuses it too, but once a stream is open
                raise APIError(413, f"the prompt has {len(ids)} tokens; this model's context is {context}",
                               param=field)
            if any(not 0 <= token < vocab for token in ids):
                raise APIError(400, f"the prompt holds token ids outside this model's vocabulary of {vocab}",
                               param=field)
        return prompts

    def _limited(self, settings: SamplingSettings, prompt_tokens: int) -> SamplingSettings:
        """The reply's limit cut at the context here although the engine cuts it too: the engine does so
        silently, and a reply knows it ended at its limit (finish_reason "length", not "stop") only by counting
        its tokens against ``max_new_tokens``."""
        context = self.engine.context_tokens
        if context is None:
            return settings if settings.max_new_tokens != UNTIL_CONTEXT else dataclasses.replace(
                settings, max_new_tokens=NO_CONTEXT_LIMIT)
        return dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, context - prompt_tokens))


def sampling(body: Sampling, limit: int | None, logprobs: int | None,
             constraint: Constraint | None = None) -> SamplingSettings:
    """The request's sampling, checked again by the engine's own rules."""
    bias = tuple(sorted((body.logit_bias or {}).items()))
    return SamplingSettings(max_new_tokens=limit or UNTIL_CONTEXT, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=body.seed, repetition_penalty=body.repetition_penalty,
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                            logit_bias=bias, logprobs=logprobs, constraint=constraint)


def router(replies: Replies) -> APIRouter:
    """``/health``, ``/v1/models`` and the completions, answered by ``replies``."""
    routes = APIRouter()
    engine = replies.engine
    card = {"id": replies.model, "object": "model", "created": 0, "owned_by": "expertswap"}

    @routes.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @routes.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        replies.require_model(name)
        return card

    @routes.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        turn = chat_turn(body, engine.chat_template)
        settings = sampling(body, body.max_completion_tokens or body.max_tokens,
                            (body.top_logprobs or 0) if body.logprobs else None, turn.constraint)
        shape = Shape(replies.model, chat=True, stops=tuple(body.stop or ()), n=body.n, reads_calls=turn.reads_calls,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage),
                      logprobs=body.logprobs)
        chars = sum(len(m.get("content") or "") for m in turn.messages)
        reply = await replies.prepare(body.model, chars, lambda: [engine.encode_chat(turn.messages, turn.tools)],
                                      request, shape, settings)
        return await replies.answer(reply, body.stream, request)

    @routes.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = body.prompts()
        settings = sampling(body, body.max_tokens, body.logprobs)
        shape = Shape(replies.model, chat=False, stops=tuple(body.stop or ()), n=body.n,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage),
                      logprobs=body.logprobs is not None)
        chars = sum(len(p) for p in prompts if isinstance(p, str))
        reply = await replies.prepare(body.model, chars, lambda: [engine.encode(p) if isinstance(p, str) else p
                                                                  for p in prompts], request, shape, settings)
        return await replies.answer(reply, body.stream, request)

    return routes
