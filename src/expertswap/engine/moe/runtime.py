"""State every committee of one engine shares: the policy in force, whether misses may load, the step lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from expertswap.engine.moe.policies import MissPolicy
from expertswap.engine.moe.step_lock import StepLock
from expertswap.engine.observe.counters import Counters
from expertswap.engine.observe.trace import TraceRecorder
from expertswap.protocol.errors import EngineBusyError, PolicyError
from expertswap.protocol.events import Telemetry
from expertswap.protocol.options import DEFAULT_EVICTION


@dataclass
class Runtime:
    """One per engine, shared by its committees; changed only through its methods, under the step lock."""

    policy: MissPolicy = field(default_factory=MissPolicy)  # chosen by name with policies.choose_policy
    eviction: str = DEFAULT_EVICTION  # or another of protocol.options.EVICTIONS
    allow_loads: bool = True
    pinned: bool = False  # a static committee: nothing loads, the swapper rests (``pin``)
    counters: Counters = field(default_factory=Counters)
    lock: StepLock = field(default_factory=StepLock)
    telemetry: Telemetry = field(default_factory=Telemetry)
    trace: TraceRecorder | None = None  # Engine.record_trace: every layer notes its routing
    packed_slots: bool = False  # slots hold packed experts, unpacked per forward on host-side routing
    active_layers: int = 0  # committees inside forward right now; swaps must only happen at 0
    swaps_during_forward: int = 0  # must stay 0: counted by apply_swaps as an invariant check
    swaps_due: threading.Event = field(default_factory=threading.Event)  # wakes the swapper: a token, a budget

    def begin_step(self, is_prefill: bool) -> None:
        """Under the step lock, before a forward: whether its misses may load, and the trace's step."""
        # substitute, cpu and lowbit keep the prompt exact (loading what it needs) and never load while decoding
        self.allow_loads = not self.pinned and (is_prefill or self.policy.loads_on_miss)
        if self.trace is not None:
            self.trace.begin()

    def end_step(self, is_prefill: bool) -> None:
        """Under the step lock, after a forward that succeeded."""
        if self.trace is not None:
            self.trace.end(is_prefill)

    def pin(self, pinned: bool, check_only: bool = False) -> None:
        """Hold the committees as they are (nothing loads, the swapper rests) or release them (the swapper wakes).

        Only under ``substitute``: nothing else computes a miss without loading it. ``check_only``: refuse now,
        before the caller fills the committees.
        """
        if pinned and not self.policy.pinnable:
            raise PolicyError(f"a pinned committee needs the substitute policy, not {self.policy.name!r}")
        if not check_only:
            self.pinned = pinned
            self.swaps_due.set()

    def switch_policy(self, policy: MissPolicy) -> None:
        """In force from the next forward (the caller holds the step lock)."""
        if self.pinned and not policy.pinnable:
            raise PolicyError("release the pinned committee (pin_committee(None)) before leaving substitute")
        self.policy = policy

    def output_key(self, budget_bytes: int) -> tuple[object, ...] | None:
        """What a forward's output depends on besides its tokens: the policy, and the budget under a policy that
        reads the residency. Keys and values kept for a later turn are reused only while it is the same; None
        (a trace is being recorded: every token's routing must be in it) reuses nothing."""
        if self.trace is not None:
            return None
        policy = self.policy
        return (policy.name, policy.routing_threshold, self.pinned, budget_bytes if policy.by_residency else None)

    def attach_trace(self, recorder: TraceRecorder | None) -> None:
        """Every layer notes its routing into ``recorder`` from the next forward (None: stop)."""
        if recorder is not None and self.trace is not None:
            raise EngineBusyError("a trace is already being recorded")
        self.trace = recorder
