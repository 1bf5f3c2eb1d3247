"""An OpenAI-compatible HTTP API over one engine (FastAPI): chat and plain completions, streamed or not.

The engine serves one reply at a time: requests wait their turn in a bounded queue (a full queue answers
429 with Retry-After), and a client that disconnects cancels its reply (``reply.py``). Who may ask and how much
it may send is ``guard.py``'s; every error is in OpenAI's JSON shape (``errors.py``). Nothing slow runs on the
event loop: prompts are encoded (one at a time, in the request's turn), and the committee curve computed, on
worker threads.
``/v1/expertswap/*`` gives what the app's panels show (stats, residency, telemetry events) and takes the
budget and the miss policy, so the app can follow a remote engine as it follows its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, BeforeValidator, Field

from expertswap.engine import Engine
from expertswap.protocol import BudgetError, Event, ExpertSwapError, PolicyError, SamplingSettings, wire

from . import errors
from .errors import APIError
from .guard import MAX_BODY_BYTES, Guard
from .reply import Reply, ReplyStream, Turns, unless_disconnected

QUEUE = 8  # requests that may wait for the engine before the next one is refused
EVENTS_KEPT = 4096  # telemetry events a polling client can still catch up on
CHARS_PER_TOKEN = 64  # more than any tokenizer packs in one token: a longer prompt cannot fit, and is not encoded
MAX_STOPS = 4  # stop sequences per request, as OpenAI takes
SEED = 2**63  # seeds are 64-bit signed integers, as OpenAI's


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


def _listed(stop: object) -> object:
    return [stop] if isinstance(stop, str) else stop


Stops = Annotated[list[str] | None, BeforeValidator(_listed), Field(max_length=MAX_STOPS)]  # one string or a list


class Sampling(BaseModel):
    model: str
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Stops = None
    seed: int | None = Field(None, ge=-SEED, lt=SEED)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


class BudgetRequest(BaseModel):
    budget: str


class PolicyRequest(BaseModel):
    policy: str
    skip_threshold: float = Field(0.0, ge=0.0, lt=1.0)


class EventLog:
    """The engine's telemetry, numbered, for clients that poll: the last ``EVENTS_KEPT`` events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.subscription = engine.subscribe(EVENTS_KEPT)
        self.events: deque[tuple[int, Event]] = deque(maxlen=EVENTS_KEPT)
        self.last = 0
        self.lock = threading.Lock()

    def since(self, after: int) -> wire.EventPage:
        """Events numbered above ``after``. A client that is new (``after`` < 0) or fell behind gets the current
        residency first, so that replaying what follows keeps its expert map right."""
        with self.lock:
            for event in self.subscription.drain():
                self.last += 1
                self.events.append((self.last, event))
            first = self.events[0][0] if self.events else self.last + 1
            behind = after < 0 or after + 1 < first
            events = [e for n, e in self.events if n > after]
        if behind:
            events.insert(0, self.engine.residency())
        return wire.EventPage(next=self.last, events=events)


def create_app(engine: Engine, model: str, api_key: str | None = None, queue: int = QUEUE,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The API for ``engine``, which it calls ``model``; ``api_key`` (if given) is required as a Bearer token,
    else only loopback Host and Origin values are answered; bodies over ``max_body_bytes`` are refused."""
    log = EventLog(engine)

    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertswap-encode")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        log.subscription.close()
        encoder.shutdown()

    app = FastAPI(title="ExpertSwap", docs_url=None, redoc_url=None, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(errors.ServerErrors)  # added last, so outermost: the guard's failures are answered too
    turns = Turns(queue)
    card = {"id": model, "object": "model", "created": 0, "owned_by": "expertswap"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        _require_model(name)
        return card

    @app.get("/v1/" + wire.STATS)
    async def stats() -> dict[str, Any]:
        return wire.figures_to_json(wire.Figures(
            stats=engine.stats(), policy=engine.policy, policies=engine.policies, device=str(engine.device),
            quantize=engine.quantize, native_format=engine.native_format, total_experts=engine.total_experts,
            resident_experts=sum(len(v) for v in engine.residency().resident.values()),
            layers=tuple(engine.layer_shapes)))

    @app.get("/v1/" + wire.RESIDENCY)
    async def residency() -> dict[str, Any]:
        return engine.residency().to_json()

    @app.get("/v1/" + wire.EVENTS)
    async def events(after: int = -1) -> dict[str, Any]:
        return wire.events_to_json(log.since(after))

    @app.post("/v1/" + wire.POLICY)
    async def policy(body: PolicyRequest) -> dict[str, Any]:
        try:
            engine.set_policy(body.policy, body.skip_threshold)
        except PolicyError as exc:
            raise APIError(400, str(exc), param="policy") from None
        return await stats()

    @app.post("/v1/" + wire.BUDGET)
    async def budget(body: BudgetRequest) -> dict[str, Any]:
        try:
            engine.set_budget(body.budget)
        except BudgetError as exc:
            raise APIError(400, str(exc), param="budget") from None
        return await stats()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        messages = [m.model_dump() for m in body.messages]
        chars = sum(len(m.content) for m in body.messages)
        return await _reply(body, chars, lambda: engine.encode_chat(messages), request, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _reply(body, len(body.prompt), lambda: engine.encode(body.prompt), request, chat=False)

    def _require_model(name: str) -> None:
        if name != model:
            raise APIError(404, f"model {name!r} does not exist: this server has {model!r}", param="model")

    async def _reply(body: Sampling, chars: int, encode: Callable[[], list[int]], request: Request,
                     chat: bool) -> Any:
        """Check what is cheap to check, wait for the engine's turn, then answer whole or streamed. A client
        that disconnects before its reply starts gives its place in the queue up, streamed or not."""
        _require_model(body.model)
        field = "messages" if chat else "prompt"
        context = engine.context_tokens
        if context is not None and chars > CHARS_PER_TOKEN * context:
            raise APIError(413, f"the prompt has {chars} characters: more than this model's context of {context} "
                                "tokens can hold", param=field)
        reply = await unless_disconnected(request.receive, _in_turn(body, encode, field, chat))
        if body.stream:
            return ReplyStream(reply, turns)  # holds the turn, given back when its response ends
        try:
            return await unless_disconnected(request.receive, reply.whole())
        finally:
            turns.give_back()

    async def _in_turn(body: Sampling, encode: Callable[[], list[int]], field: str, chat: bool) -> Reply:
        """Take the engine's turn, then encode the prompt: a full queue is refused before anything is encoded,
        and prompts are encoded one at a time (issue 27: each can be 8 MiB). The turn is given back if no reply
        comes of it."""
        await turns.take()
        try:
            ids = await _encoded(encode, field)
            return Reply(engine, ids, _settings(body, len(ids)), body.stop or [], model, chat)
        except BaseException:  # a refused prompt, or the client gone (cancelled)
            turns.give_back()
            raise

    async def _encoded(encode: Callable[[], list[int]], field: str) -> list[int]:
        """The prompt's ids, encoded on ``encoder``'s one thread (off the event loop): an encode that outlives
        its request, whose client left, still finishes before the next one starts."""
        try:
            ids = list(await asyncio.get_running_loop().run_in_executor(encoder, encode))
        except ExpertSwapError as exc:  # not text, or a chat template that refuses these messages
            raise APIError(400, str(exc), param=field) from None
        context = engine.context_tokens
        if context is not None and len(ids) >= context:  # the engine refuses it too, but once a stream is open
            raise APIError(413, f"the prompt has {len(ids)} tokens; this model's context is {context}", param=field)
        return ids

    def _settings(body: Sampling, prompt_tokens: int) -> SamplingSettings:
        """The request's sampling. The reply's limit is cut at the context here although the engine cuts it
        too: the engine does so silently, and a reply knows it ended at its limit (finish_reason "length",
        not "stop") only by counting its tokens against ``max_new_tokens``."""
        limit = body.max_completion_tokens or body.max_tokens or 256
        context = engine.context_tokens
        if context is not None:
            limit = min(limit, context - prompt_tokens)
        return SamplingSettings(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed)

    return app
