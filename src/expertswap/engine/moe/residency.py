"""What every committee holds, read in one go: the snapshot the expert map, the server and the budget publish."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expertswap.engine.moe.committee import Committee
from expertswap.protocol.events import ResidencySnapshot


def residency(committees: Sequence[Committee]) -> ResidencySnapshot:
    """The resident experts and importance of every MoE layer (the caller holds the step lock).

    One device read for every layer's counters: this runs after each token while someone listens.
    """
    flat = torch.cat([t for c in committees for t in (c.cache.routed, c.cache.last_token)]).tolist()
    routed, last = {}, {}
    for c in committees:
        routed[c.layer], flat = flat[: c.num_experts], flat[c.num_experts :]
        last[c.layer], flat = sorted(e for e in flat[: c.top_k] if e >= 0), flat[c.top_k :]
    return ResidencySnapshot(
        resident={c.layer: sorted(c.resident_experts) for c in committees},
        importance={c.layer: [round(float(v), 6) for v in c.cache.scores()] for c in committees},
        capacity={c.layer: c.capacity for c in committees},
        routed=routed,
        last_token=last,
    )


def resident_bytes(committees: Sequence[Committee]) -> int:
    """Bytes held by every committee's slot tensors right now."""
    return sum(c.resident_bytes for c in committees)
