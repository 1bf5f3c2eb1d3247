"""Typed telemetry events and a thread-safe publish/subscribe hub: the only way the GUI learns anything.

Events carry a monotonic timestamp ``t`` (time.monotonic seconds) and a ``type``. Swap and residency
events are published under the engine's step lock, so replaying the swaps that follow one
residency snapshot gives exactly the next snapshot.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


def _now() -> float:
    return time.monotonic()


@dataclass(frozen=True)
class Event:
    """Base of all events; ``to_json`` gives a plain dict with its ``type``."""

    type: ClassVar[str] = "event"
    t: float = field(default_factory=_now, kw_only=True)

    def to_json(self) -> dict[str, object]:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True)
class SwapEvent(Event):
    """An expert entered a slot (``expert_in``) and/or left one (``expert_out``); -1 means none."""

    type: ClassVar[str] = "swap"
    layer: int
    expert_in: int
    expert_out: int
    bytes: int
    ms: float
    reason: str  # miss | prefetch | grow | shrink


@dataclass(frozen=True)
class ResidencySnapshot(Event):
    """Per MoE layer: resident experts, every expert's importance and routing count, the latest token's experts."""

    type: ClassVar[str] = "residency"
    resident: dict[int, list[int]]
    importance: dict[int, list[float]]
    capacity: dict[int, int]
    routed: dict[int, list[int]]
    last_token: dict[int, list[int]]


@dataclass(frozen=True)
class MemorySample(Event):
    """Process and device memory, sampled periodically."""

    type: ClassVar[str] = "memory"
    rss_bytes: int
    available_ram_bytes: int
    cuda_allocated_bytes: int
    cuda_reserved_bytes: int
    cuda_free_bytes: int
    budget_bytes: int
    resident_expert_bytes: int
    follow_bytes: int = 0  # the budget "follow free memory" sets (or would): resident + free - margin; 0: unknown


@dataclass(frozen=True)
class TokenStats(Event):
    """After every generated token: the reply's speed, its decode's hit rate (lookups since its first token: the
    prompt's loads are not the committee's doing) and the engine's routing outcomes so far."""

    type: ClassVar[str] = "token"
    tokens: int
    tokens_per_s: float
    hit_rate: float
    expert_loads: int
    skipped: int
    substituted: int
    cpu_computed: int


@dataclass(frozen=True)
class BudgetChange(Event):
    """The budget asked for (``applied`` False) or put in force (``applied`` True)."""

    type: ClassVar[str] = "budget"
    old_bytes: int
    new_bytes: int
    applied: bool
    capacities: list[int]
    reason: str = "user"  # "user", "follow" (free memory moved) or "oom" (a step ran out of memory)


@dataclass(frozen=True)
class PackProgress(Event):
    """The packed expert file (``--quantize``): ``layers_done`` of ``layers`` written; ``error`` says why packing
    stopped (a full or read-only disk), and the engine then quantises misses as it reads them."""

    type: ClassVar[str] = "pack"
    layers_done: int
    layers: int
    bytes_written: int
    error: str = ""


EVENTS: dict[str, type[Event]] = {c.type: c for c in (SwapEvent, ResidencySnapshot, MemorySample, TokenStats,
                                                     BudgetChange, PackProgress)}


def event_from_json(data: dict[str, Any]) -> Event:
    """The event ``to_json`` gave (sent over HTTP, say): JSON's string keys of per-layer maps become ints again.

    Raises ``ValueError`` for an unknown type or missing fields."""
    cls = EVENTS.get(str(data.get("type")))
    if cls is None:
        raise ValueError(f"unknown telemetry event type {data.get('type')!r}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            raise ValueError(f"{cls.type} event without {f.name!r}")
        value = data[f.name]
        values[f.name] = {int(k): v for k, v in value.items()} if isinstance(value, dict) else value
    return cls(**values)


class Subscription:
    """A bounded queue of events for one consumer; the oldest events go first when it overflows."""

    def __init__(self, hub: Telemetry, maxsize: int, every_token: bool = False) -> None:
        self._hub = hub
        self._queue: queue.Queue[Event] = queue.Queue(maxsize)
        self.every_token = every_token  # each token's stats and snapshot, not a frame's (a log, not a window)

    def put(self, event: Event) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def get(self, timeout: float | None = None) -> Event | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[Event]:
        """Every event waiting now, oldest first, without blocking."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def close(self) -> None:
        self._hub.unsubscribe(self)


class Telemetry:
    """Fan-out of events to any number of subscribers, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []

    def subscribe(self, maxsize: int = 100_000, every_token: bool = False) -> Subscription:
        sub = Subscription(self, maxsize, every_token)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    @property
    def every_token(self) -> bool:
        """Whether a subscriber wants every token's stats and snapshot (else a frame's do)."""
        return any(sub.every_token for sub in self._subscribers)

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.put(event)
