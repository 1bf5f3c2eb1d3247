"""The ``/v1/expertswap`` JSON: written by the server and read by the client, defined once, here.

Paths are relative to the API root (``/v1/``). Every body is a JSON object; the functions below are the only
places its keys are spelled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from expertswap.protocol.events import Event, ResidencySnapshot, event_from_json
from expertswap.protocol.plan import LayerShape
from expertswap.protocol.stats import EngineStats

STATS = "expertswap/stats"  # GET: Figures
RESIDENCY = "expertswap/residency"  # GET: a ResidencySnapshot
EVENTS = "expertswap/events"  # GET ?after=N: EventPage
BUDGET = "expertswap/budget"  # POST budget_request: Figures
POLICY = "expertswap/policy"  # POST policy_request: Figures


@dataclass(frozen=True)
class Figures:
    """An engine as the app's panels show it: its stats, and what it is."""

    stats: EngineStats
    policy: str
    policies: tuple[str, ...]
    device: str
    quantize: str | None
    native_format: str | None
    total_experts: int
    resident_experts: int
    layers: tuple[LayerShape, ...]  # each MoE layer's shape: what the planner sizes committees from


@dataclass(frozen=True)
class EventPage:
    """Telemetry events numbered up to ``next``; a client asks for those after the last ``next`` it saw."""

    next: int
    events: list[Event]


def figures_to_json(figures: Figures) -> dict[str, Any]:
    return {**dataclasses.asdict(figures.stats), "hit_rate": figures.stats.hit_rate, "policy": figures.policy,
            "policies": list(figures.policies), "device": figures.device, "quantize": figures.quantize,
            "native_format": figures.native_format, "total_experts": figures.total_experts,
            "resident_experts": figures.resident_experts,
            "layers": [[s.num_experts, s.top_k, s.expert_bytes] for s in figures.layers]}


def figures_from_json(body: dict[str, Any]) -> Figures:
    """Raises ``KeyError``, ``TypeError`` or ``ValueError`` on a body that is not one."""
    stats = EngineStats(**{f.name: (float if f.type == "float" else int)(body[f.name])  # type: ignore[arg-type]
                           for f in _STATS_FIELDS})
    return Figures(stats=stats, policy=str(body["policy"]), policies=tuple(map(str, body["policies"])),
                   device=str(body["device"]), quantize=_optional(body["quantize"]),
                   native_format=_optional(body["native_format"]), total_experts=int(body["total_experts"]),
                   resident_experts=int(body["resident_experts"]),
                   layers=tuple(LayerShape(int(e), int(k), int(b)) for e, k, b in body["layers"]))


def budget_request(budget: str | int) -> dict[str, Any]:
    return {"budget": str(budget)}


def policy_request(policy: str, skip_threshold: float) -> dict[str, Any]:
    return {"policy": policy, "skip_threshold": skip_threshold}


def events_to_json(page: EventPage) -> dict[str, Any]:
    return {"next": page.next, "events": [event.to_json() for event in page.events]}


def events_from_json(body: dict[str, Any]) -> EventPage:
    return EventPage(next=int(body["next"]), events=[event_from_json(e) for e in body["events"]])


def residency_from_json(body: dict[str, Any]) -> ResidencySnapshot:
    event = event_from_json(body)
    if not isinstance(event, ResidencySnapshot):
        raise ValueError(f"expected a residency snapshot, got {body.get('type')!r}")
    return event


def _optional(value: object) -> str | None:
    return None if value is None else str(value)


_STATS_FIELDS = dataclasses.fields(EngineStats)
