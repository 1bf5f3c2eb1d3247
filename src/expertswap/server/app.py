"""An OpenAI-compatible HTTP API over one engine (FastAPI): chat and plain completions, streamed or not.

The engine serves one reply at a time: requests wait their turn in a bounded queue (a full queue answers
429 with Retry-After), and a client that disconnects cancels its reply. Errors use OpenAI's JSON shape.
``/v1/expertswap/*`` gives what the app's panels show (stats, residency, telemetry events) and takes the
budget and the miss policy, so the app can follow a remote engine as it follows its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from expertswap.engine import BudgetError, Engine, EngineBusyError, ExpertSwapError, PolicyError, SamplingSettings

QUEUE = 8  # requests that may wait for the engine before the next one is refused
EVENTS_KEPT = 4096  # telemetry events a polling client can still catch up on
MAX_CURVE_POINTS = 10_001  # budgets at which /v1/expertswap/committee gives the committee size


class APIError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model: str
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None


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
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=EVENTS_KEPT)
        self.last = 0
        self.lock = threading.Lock()

    def since(self, after: int) -> dict[str, Any]:
        """Events numbered above ``after``. A client that is new (``after`` < 0) or fell behind gets the current
        residency first, so that replaying what follows keeps its expert map right."""
        with self.lock:
            for event in self.subscription.drain():
                self.last += 1
                self.events.append((self.last, event.to_json()))
            first = self.events[0][0] if self.events else self.last + 1
            behind = after < 0 or after + 1 < first
            events = [e for n, e in self.events if n > after]
        if behind:
            events.insert(0, self.engine.residency().to_json())
        return {"next": self.last, "events": events}


def _error(status: int, message: str, kind: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                        headers=headers)


class Turns:
    """One reply at a time, the rest waiting in order, at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size, self.waiting = size, 0
        self.lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        if self.lock.locked() and self.waiting >= self.size:
            raise APIError(429, "the server is busy: try again shortly", "rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *_: object) -> None:
        self.lock.release()


def create_app(engine: Engine, model: str, api_key: str | None = None, queue: int = QUEUE) -> FastAPI:
    """The API for ``engine``, which it calls ``model``; ``api_key`` (if given) is required as a Bearer token."""
    log = EventLog(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        log.subscription.close()

    app = FastAPI(title="ExpertSwap", docs_url=None, redoc_url=None, lifespan=lifespan)
    turns = Turns(queue)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"{field or 'request'}: {first.get('msg', 'invalid request')}", "invalid_request_error",
                      field)

    @app.middleware("http")
    async def authorise(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "missing or wrong API key", "invalid_request_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "expertswap"}]}

    @app.get("/v1/expertswap/stats")
    async def stats() -> dict[str, Any]:
        s = engine.stats()
        return {**dataclasses.asdict(s), "hit_rate": s.hit_rate,
                "resident_experts": sum(len(v) for v in engine.residency().resident.values()),
                "committee_experts": engine.committee_size(s.budget_bytes),
                "total_experts": engine.total_experts, "policy": engine.policy, "policies": list(engine.policies),
                "device": str(engine.device), "quantize": engine.quantize, "native_format": engine.native_format}

    @app.get("/v1/expertswap/committee")
    async def committee(points: int = Query(101, ge=2, le=MAX_CURVE_POINTS)) -> dict[str, Any]:
        """The planner's committee size at ``points`` budgets spread evenly from the minimum to all experts
        (``minimum + span * i // (points - 1)``): a slider over that range can label each of its positions."""
        low, high = engine.minimum_budget_bytes, engine.total_expert_bytes
        budgets = [low + (high - low) * i // (points - 1) for i in range(points)]
        return {"budgets": budgets, "experts": [engine.committee_size(b) for b in budgets]}

    @app.get("/v1/expertswap/residency")
    async def residency() -> dict[str, Any]:
        return engine.residency().to_json()

    @app.get("/v1/expertswap/events")
    async def events(after: int = -1) -> dict[str, Any]:
        return log.since(after)

    @app.post("/v1/expertswap/policy")
    async def policy(body: PolicyRequest) -> dict[str, Any]:
        try:
            engine.set_policy(body.policy, body.skip_threshold)
        except PolicyError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "policy") from None
        return await stats()

    @app.post("/v1/expertswap/budget")
    async def budget(body: BudgetRequest) -> dict[str, Any]:
        try:
            engine.set_budget(body.budget)
        except BudgetError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "budget") from None
        return await stats()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        ids = _encode(lambda: engine.encode_chat([m.model_dump() for m in body.messages]))
        return await _reply(body, ids, request, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        ids = _encode(lambda: engine.encode(body.prompt))
        return await _reply(body, ids, request, chat=False)

    def _encode(encode: Any) -> list[int]:
        try:
            return list(encode())
        except ExpertSwapError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "messages") from None

    async def _reply(body: Sampling, ids: list[int], request: Request, chat: bool) -> Any:
        if body.model != model:
            raise APIError(404, f"model {body.model!r} does not exist: this server has {model!r}",
                           "invalid_request_error", "model")
        limit = body.max_completion_tokens or body.max_tokens or 256
        context = engine.context_tokens
        if context is not None and len(ids) + 1 > context:
            raise APIError(413, f"the prompt has {len(ids)} tokens; this model's context is {context}",
                           "invalid_request_error", "messages" if chat else "prompt")
        limit = min(limit, context - len(ids)) if context is not None else limit
        settings = SamplingSettings(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                    seed=body.seed)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        reply = _Reply(engine, ids, settings, stops, model, chat)
        if body.stream:
            await turns.__aenter__()  # the turn is held by the stream, given back when it ends or is cut
            return StreamingResponse(reply.sse(turns, request), media_type="text/event-stream")
        async with turns:
            try:
                return await reply.whole()
            except EngineBusyError as exc:  # the app that serves this engine is answering in its own window
                raise APIError(503, str(exc), "server_busy", headers={"Retry-After": "1"}) from None

    return app


class _Reply:
    """One request's generation: stop sequences cut the text, and the finish reason and usage follow it."""

    def __init__(self, engine: Engine, ids: list[int], settings: SamplingSettings, stops: list[str], model: str,
                 chat: bool) -> None:
        self.engine, self.ids, self.settings, self.stops = engine, ids, settings, stops
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.tokens = 0
        self.finish = "length"

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text as it comes, cut before the first stop sequence."""
        text, sent = "", 0
        stream = self.engine.stream_ids(self.ids, self.settings)
        try:
            async for chunk in stream:
                self.tokens += 1
                text += chunk.text
                cut = min((i for i in (text.find(s) for s in self.stops if s) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    self.finish = "stop"
                    return
                keep = max((len(s) - 1 for s in self.stops), default=0)  # a stop may still be forming
                if len(text) - keep > sent:
                    yield text[sent : len(text) - keep]
                    sent = len(text) - keep
            if self.tokens < self.settings.max_new_tokens:
                self.finish = "stop"  # the model ended its reply
            if len(text) > sent:
                yield text[sent:]
        finally:
            await stream.aclose()  # a cut or a disconnect cancels the generation

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.tokens,
                "total_tokens": len(self.ids) + self.tokens}

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if delta:
            return {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    def _object(self, chunk: bool) -> str:
        return ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")

    async def whole(self) -> dict[str, Any]:
        text = "".join([piece async for piece in self.pieces()])
        return {"id": self.id, "object": self._object(False), "created": self.created, "model": self.model,
                "choices": [self._choice(text, self.finish, delta=False)], "usage": self.usage()}

    async def sse(self, turns: Turns, request: Request) -> AsyncIterator[str]:
        def event(choice: dict[str, Any], usage: bool = False) -> str:
            body = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
                    "choices": [choice]}
            if usage:
                body["usage"] = self.usage()
            return f"data: {json.dumps(body)}\n\n"

        try:
            if self.chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for piece in self.pieces():
                if await request.is_disconnected():
                    return
                yield event(self._choice(piece, None, delta=True))
            yield event(self._choice(None, self.finish, delta=True), usage=True)
            yield "data: [DONE]\n\n"
        except ExpertSwapError as exc:  # after the headers went out: OpenAI's in-stream error event
            kind = "server_busy" if isinstance(exc, EngineBusyError) else "server_error"
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind, 'param': None, 'code': None}})}\n\n"
        finally:
            await turns.__aexit__()
