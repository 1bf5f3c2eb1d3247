"""``/v1/expertswap/*``: what the app's panels show (stats, residency, telemetry events), and the budget and the miss
policy to set, so that the app follows a remote engine as it follows its own. The JSON is ``wire``'s, which the
client reads too."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from fastapi import APIRouter

from expertswap.engine import Engine
from expertswap.protocol import BudgetError, Event, PolicyError, wire

from .errors import APIError
from .schemas import BudgetRequest, PolicyRequest

EVENTS_KEPT = 4096  # telemetry events a polling client can still catch up on


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

    def close(self) -> None:
        """Stop listening: the engine outlives the server (the app serves the model its window has loaded)."""
        self.subscription.close()


def figures(engine: Engine) -> wire.Figures:
    """The engine as the stats endpoint reports it, and as setting the budget or the policy answers."""
    return wire.Figures(
        stats=engine.stats(), policy=engine.policy, policies=engine.policies, device=str(engine.device),
        quantize=engine.quantize, native_format=engine.native_format, total_experts=engine.total_experts,
        resident_experts=sum(len(v) for v in engine.residency().resident.values()),
        layers=tuple(engine.layer_shapes))


def router(engine: Engine, log: EventLog) -> APIRouter:
    """The routes over ``engine``, whose telemetry ``log`` numbers."""
    routes = APIRouter(prefix="/v1")

    @routes.get("/" + wire.STATS)
    async def stats() -> dict[str, Any]:
        return wire.figures_to_json(figures(engine))

    @routes.get("/" + wire.RESIDENCY)
    async def residency() -> dict[str, Any]:
        return engine.residency().to_json()

    @routes.get("/" + wire.EVENTS)
    async def events(after: int = -1) -> dict[str, Any]:
        return wire.events_to_json(log.since(after))

    @routes.post("/" + wire.POLICY)
    async def policy(body: PolicyRequest) -> dict[str, Any]:
        try:
            engine.set_policy(body.policy, body.skip_threshold)
        except PolicyError as exc:
            raise APIError(400, str(exc), param="policy") from None
        return wire.figures_to_json(figures(engine))

    @routes.post("/" + wire.BUDGET)
    async def budget(body: BudgetRequest) -> dict[str, Any]:
        try:
            engine.set_budget(body.budget)
        except BudgetError as exc:
            raise APIError(400, str(exc), param="budget") from None
        return wire.figures_to_json(figures(engine))

    return routes
