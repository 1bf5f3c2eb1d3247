"""State every committee of one engine shares: the policy in force, whether misses may load, the step lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from expertswap.engine.observe.counters import Counters
from expertswap.engine.observe.trace import TraceRecorder
from expertswap.protocol.events import Telemetry
from expertswap.protocol.options import DEFAULT_EVICTION


@dataclass
class Runtime:
    """State every committee of one engine shares: policy, whether misses may load, lock, telemetry."""

    policy: str = "exact"
    skip_threshold: float = 0.0
    eviction: str = DEFAULT_EVICTION  # or another of expert_cache.EVICTIONS
    allow_loads: bool = True
    pinned: bool = False  # a static committee: nothing loads, the swapper rests (Engine.pin_committee)
    counters: Counters = field(default_factory=Counters)
    lock: threading.RLock = field(default_factory=threading.RLock)
    telemetry: Telemetry = field(default_factory=Telemetry)
    trace: TraceRecorder | None = None  # Engine.record_trace: every layer notes its routing
    packed_slots: bool = False  # slots hold packed experts, unpacked per forward on host-side routing
    active_layers: int = 0  # committees inside forward right now; swaps must only happen at 0
    swaps_during_forward: int = 0  # must stay 0: counted by apply_swaps as an invariant check

    @property
    def loads_on_miss(self) -> bool:
        """exact and skip load a routed expert that is missing, also while decoding; the others never do then."""
        return self.policy in ("exact", "skip")
