"""Every count the engine reports, in one place with named fields.

Routing counts change inside the forward, in every MoE layer, on every token: they stay on the device
(reading them would cost a host sync per layer, and a captured CUDA graph advances them in place), one
small tensor per layer with a named view per count. Everything else is host work and counted on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class RoutingCounts:
    """One MoE layer's routing counts on its device; ``hits += n`` adds in place (graph-safe)."""

    NAMES = ("hits", "misses", "skipped", "substituted")

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(len(self.NAMES), dtype=torch.long, device=device)
        self.hits, self.misses, self.skipped, self.substituted = self.tensor.unbind(0)


@dataclass
class Counters:
    """The engine's counts: host counts as fields, routing counts summed from every layer's ``RoutingCounts``."""

    loads: int = 0  # experts copied into a slot (misses, prefetches, growth)
    bytes_loaded: int = 0
    extra_passes: int = 0  # forwards that ran in more than one pass because the committee was too small
    cpu_computed: int = 0  # (token, expert) rows computed on the host (the ``cpu`` policy)
    background_swaps: int = 0  # swaps the background swapper made between tokens
    low_precision: int = 0  # (token, expert) rows computed from an expert's nf4 copy (the ``lowbit`` policy)


@dataclass(frozen=True)
class Totals:
    """Every count at one moment: the host counts and the routing counts of all layers (one device read)."""

    loads: int
    bytes_loaded: int
    extra_passes: int
    cpu_computed: int
    background_swaps: int
    low_precision: int
    hits: int
    misses: int
    skipped: int
    substituted: int

    @property
    def hit_rate(self) -> float:
        """Routed lookups whose expert was resident (1.0 before any)."""
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 1.0


def totals(counters: Counters, routing: list[RoutingCounts]) -> Totals:
    summed = torch.stack([r.tensor for r in routing]).sum(dim=0).tolist() if routing else [0] * 4
    host = {f.name: getattr(counters, f.name) for f in fields(counters)}
    return Totals(**host, **dict(zip(RoutingCounts.NAMES, summed, strict=True)))
