"""OpenAI's API over one engine: the model list, chat and plain completions, streamed or not.

A request is checked where that is cheap (the model's name, the prompt's length in characters), then waits for
the engine's turn (``turns.py``), is encoded in that turn on a worker thread, and is answered by a ``Reply``
(``reply.py``). A client that disconnects before its reply starts gives its place in the queue up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request

from expertswap.engine import Engine
from expertswap.protocol import ExpertSwapError, SamplingSettings

from .errors import APIError
from .reply import Reply, ReplyStream, unless_disconnected
from .schemas import ChatRequest, CompletionRequest, Sampling
from .turns import Turns

CHARS_PER_TOKEN = 64  # more than any tokenizer packs in one token: a longer prompt cannot fit, and is not encoded
MAX_NEW_TOKENS = 256  # a reply's limit when the request sets none


class Replies:
    """The completions of ``engine``, which the API calls ``model``: one at a time, in ``turns``."""

    def __init__(self, engine: Engine, model: str, turns: Turns) -> None:
        self.engine, self.model, self.turns = engine, model, turns
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertswap-encode")

    def close(self) -> None:
        self.encoder.shutdown()

    def require_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"model {name!r} does not exist: this server has {self.model!r}", param="model")

    async def reply(self, body: Sampling, chars: int, encode: Callable[[], list[int]], request: Request,
                    chat: bool) -> Any:
        """Check what is cheap to check, wait for the engine's turn, then answer whole or streamed. A client
        that disconnects before its reply starts gives its place in the queue up, streamed or not."""
        self.require_model(body.model)
        field = "messages" if chat else "prompt"
        context = self.engine.context_tokens
        if context is not None and chars > CHARS_PER_TOKEN * context:
            raise APIError(413, f"the prompt has {chars} characters: more than this model's context of {context} "
                                "tokens can hold", param=field)
        reply = await unless_disconnected(request.receive, self._in_turn(body, encode, field, chat))
        if body.stream:
            return ReplyStream(reply, self.turns)  # holds the turn, given back when its response ends
        try:
            return await unless_disconnected(request.receive, reply.whole())
        finally:
            self.turns.give_back()

    async def _in_turn(self, body: Sampling, encode: Callable[[], list[int]], field: str, chat: bool) -> Reply:
        """Take the engine's turn, then encode the prompt: a full queue is refused before anything is encoded,
        and prompts are encoded one at a time (issue 27: each can be 8 MiB). The turn is given back if no reply
        comes of it."""
        await self.turns.take()
        try:
            ids = await self._encoded(encode, field)
            return Reply(self.engine, ids, self._settings(body, len(ids)), body.stop or [], self.model, chat)
        except BaseException:  # a refused prompt, or the client gone (cancelled)
            self.turns.give_back()
            raise

    async def _encoded(self, encode: Callable[[], list[int]], field: str) -> list[int]:
        """The prompt's ids, encoded on ``encoder``'s one thread (off the event loop): an encode that outlives
        its request, whose client left, still finishes before the next one starts."""
        try:
            ids = list(await asyncio.get_running_loop().run_in_executor(self.encoder, encode))
        except ExpertSwapError as exc:  # not text, or a chat template that refuses these messages
            raise APIError(400, str(exc), param=field) from None
        context = self.engine.context_tokens
        if context is not None and len(ids) >= context:  # the engine refuses it too, but once a stream is open
            raise APIError(413, f"the prompt has {len(ids)} tokens; this model's context is {context}", param=field)
        return ids

    def _settings(self, body: Sampling, prompt_tokens: int) -> SamplingSettings:
        """The request's sampling. The reply's limit is cut at the context here although the engine cuts it
        too: the engine does so silently, and a reply knows it ended at its limit (finish_reason "length",
        not "stop") only by counting its tokens against ``max_new_tokens``."""
        limit = body.max_completion_tokens or body.max_tokens or MAX_NEW_TOKENS
        context = self.engine.context_tokens
        if context is not None:
            limit = min(limit, context - prompt_tokens)
        return SamplingSettings(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, repetition_penalty=body.repetition_penalty)


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
        messages = [m.model_dump() for m in body.messages]
        chars = sum(len(m.content) for m in body.messages)
        return await replies.reply(body, chars, lambda: engine.encode_chat(messages), request, chat=True)

    @routes.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await replies.reply(body, len(body.prompt), lambda: engine.encode(body.prompt), request, chat=False)

    return routes
