"""One MoE layer's residency decisions, with no weights: the policy's bookkeeping apart from the copying.

What a routing hits, which slot a miss takes, what the swapper brings in, what a shrink keeps. The
committee runs this beside its slot weights; the trace replay (``benchmarks/replay.py``) runs the very
same code on recorded routings with no weights at all, so its hit rates are those of the code that runs.
Every update is device work (a captured CUDA graph replays it); only the decisions read the host.
"""

from __future__ import annotations

import torch

from expertswap.engine.device import triton_serves
from expertswap.engine.moe.policies import skip_routings
from expertswap.engine.moe.slot_map import SlotMap
from expertswap.engine.observe.counters import RoutingCounts
from expertswap.protocol.errors import PolicyError
from expertswap.protocol.options import DEFAULT_EVICTION, EVICTIONS

# how a miss picks its victim (and what the swapper and a shrink keep): SwapMoE's importance (decayed
# |x| * routing weight, times |expert|), least recently routed, or routed least often (decayed counts)
DECAY_PER_TOKEN = 0.95
SWAP_HYSTERESIS = 1.25



def check_eviction(name: str) -> None:
    """The one check of an eviction's name: at load, before anything is read, and for every cache."""
    if name not in EVICTIONS:
        raise PolicyError(f"eviction must be one of {', '.join(EVICTIONS)}, got {name!r}")

class ExpertCache:
    """The residency state and decisions of one layer's committee of ``capacity`` of ``num_experts`` experts."""

    def __init__(self, num_experts: int, top_k: int, capacity: int, device: torch.device,
                 eviction: str = DEFAULT_EVICTION) -> None:
        check_eviction(eviction)
        self.num_experts, self.top_k, self.eviction = num_experts, top_k, eviction
        E = num_experts
        self.slots = SlotMap(E, capacity, device)
        self.routing = RoutingCounts(device)
        self.importance = torch.zeros(E, device=device)
        self.frequency = torch.zeros(E, device=device)  # decayed routing counts (lfu)
        self.norms = torch.full((E,), float("nan"), device=device)  # |expert|, known once it has been loaded
        self.routed = torch.zeros(E, dtype=torch.long, device=device)  # how often the router chose each expert
        self.last_token = torch.full((top_k,), -1, dtype=torch.long, device=device)  # the latest token's choice
        self.last_used = torch.zeros(E, dtype=torch.long, device=device)  # forward count when last routed to (lru)
        self.clock = torch.zeros((), dtype=torch.long, device=device)  # on the device: a captured step advances it
        self.kernels = triton_serves(device)  # a token's observe and place as one program each (cache_kernels)

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    def device_state(self) -> list[torch.Tensor]:
        """The tensors ``observe`` advances in place (a captured step's warmup run must put them back)."""
        return [self.importance, self.frequency, self.routed, self.routing.tensor, self.last_used, self.clock,
                self.last_token]

    def observe(self, index: torch.Tensor, weights: torch.Tensor, hidden: torch.Tensor | None = None,
                skip_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing bookkeeping before any load: scores, counts, stamps, skipping. Device work only.

        Each token's routings weigh its |``hidden``| in importance (the committee passes the layer's input
        [T, H]); None weighs them all 1 (a trace has no hidden states). Returns the routing as skipping leaves
        it and which routed experts are resident now.
        """
        rows = index.shape[0]
        if self.kernels and rows == 1 and hidden is not None and skip_threshold == 0:
            from expertswap.engine.moe import cache_kernels  # Triton: only where a GPU is

            resident = cache_kernels.observe(hidden.detach(), index, weights, self.importance, self.frequency,
                                             self.routed, self.last_used, self.clock, self.last_token,
                                             self.slots.device_map, self.routing.tensor, self.eviction,
                                             DECAY_PER_TOKEN)
            return index, weights, resident
        signal = hidden.detach().float().norm(dim=-1, keepdim=True) if hidden is not None else 1.0
        contribution = weights.detach().float() * signal
        self.importance.mul_(DECAY_PER_TOKEN**rows)
        self.importance.index_add_(0, index.reshape(-1), contribution.reshape(-1))  # the router's ids: none < 0
        if skip_threshold > 0:
            index, weights, dropped = skip_routings(index, weights, skip_threshold)
            self.routing.skipped += dropped
        valid = index >= 0
        clamped = index.clamp(min=0)
        self.routed.scatter_add_(0, clamped.flatten(), valid.flatten().long())
        if self.eviction == "lfu":
            self.frequency.mul_(DECAY_PER_TOKEN**rows)
            self.frequency.index_add_(0, clamped.flatten(), valid.flatten().float())
        elif self.eviction == "lru":
            self.clock += 1
            stamp = torch.where(valid, self.clock, 0).flatten()
            self.last_used.scatter_reduce_(0, clamped.flatten(), stamp, reduce="amax")
        self.last_token.copy_(index[-1])
        resident = (self.slots.device_map[clamped] >= 0) & valid
        self.routing.hits += resident.sum()
        self.routing.misses += (valid & ~resident).sum()
        return index, weights, resident

    def scores(self) -> torch.Tensor:
        """SwapMoE importance per expert on the host: decayed sum of |x| * routing weight, times |expert|."""
        norms = self.norms.cpu()
        known = ~norms.isnan()
        default = norms[known].mean() if bool(known.any()) else 1.0
        return self.importance.float().cpu() * norms.nan_to_num(float(default))

    def rank(self) -> torch.Tensor:
        """Per expert on the host, higher = keep: the eviction's own measure."""
        if self.eviction == "lru":
            return self.last_used.cpu().double()
        if self.eviction == "lfu":
            return self.frequency.cpu().double()
        return self.scores().double()

    def device_rank(self) -> torch.Tensor:
        """``rank`` on the device, with no host sync (the host-free decode step ranks its victims with it)."""
        if self.eviction == "lru":
            return self.last_used.double()
        if self.eviction == "lfu":
            return self.frequency.double()
        known = ~self.norms.isnan()
        default = torch.where(known.any(), self.norms.nanmean(), 1.0)
        return (self.importance.float() * torch.where(known, self.norms, default)).double()

    def place(self, index: torch.Tensor, log: torch.Tensor) -> torch.Tensor:
        """Give every expert one token routes to a slot, on the device: the decisions ``loads`` makes on the host.

        A missing expert takes the best victim (an empty slot first, then the lowest ranked, never one
        holding a routed expert), in the order of the experts' ids; both maps are updated in place. ``log``
        [k, 3] gets rows (expert, slot, expert it replaced) sorted by expert, (-1, -1, -1) for the resident
        ones: the host installs them after the token (``SlotMap.install``). Returns the slot each routed
        pair fills, in routing order (-1 for the resident): the kernel writes those slots as it reads.
        """
        slots = self.slots
        if self.kernels:
            from expertswap.engine.moe import cache_kernels  # Triton: only where a GPU is

            return cache_kernels.place(index, slots.device_map, slots.device_slots, self.importance, self.frequency,
                                       self.last_used, self.norms, log, self.eviction)
        capacity, spare = slots.capacity, self.num_experts
        experts, order = index[0].sort(stable=True)
        current = slots.device_map[experts.clamp(min=0)]
        missing = (current < 0) & (experts >= 0)
        held = slots.device_slots
        in_use = torch.zeros(capacity + 1, dtype=torch.bool, device=index.device)
        in_use.index_fill_(0, torch.where(missing | (experts < 0), capacity, current), True)  # no host scalar
        rank = torch.where(held < 0, -1.0, self.device_rank()[held.clamp(min=0)])
        victims = rank.masked_fill(in_use[:capacity], float("inf")).sort(stable=True).indices
        fill = torch.where(missing, victims[(missing.cumsum(0) - 1).clamp(min=0)], -1)
        target = torch.where(missing, fill, capacity)  # the spare entry for the resident ones
        old = slots.padded_slots[target]
        slots.padded_map.index_fill_(0, torch.where(old >= 0, old, spare), -1)
        slots.padded_map.index_put_((torch.where(missing, experts, spare),), torch.where(missing, fill, -1))
        slots.padded_slots.index_put_((target,), torch.where(missing, experts, -1))
        log.copy_(torch.stack([torch.where(missing, experts, -1), fill, old], dim=1))
        return torch.empty_like(fill).index_copy_(0, order, fill)

    @staticmethod
    def needed(index: torch.Tensor) -> list[int]:
        """The distinct experts a routing names (one host sync)."""
        host_index = index.cpu()
        return torch.unique(host_index[host_index >= 0]).tolist()

    def victims(self, keep: set[int]) -> list[int]:
        """Slots to load into, best first: empty ones, then the lowest ranked; never one holding ``keep``."""
        rank = self.rank()
        held = self.slots.slot_to_expert
        free = [s for s, e in enumerate(held) if e not in keep]
        free.sort(key=lambda s: -1.0 if held[s] < 0 else float(rank[held[s]]))
        return free

    def passes(self, needed: list[int]) -> list[list[int]]:
        """The groups an exact forward loads and computes: all at once, or, when it needs more experts than
        there are slots (a long prompt at a small budget), ``capacity`` at a time, the resident ones first."""
        if len(needed) <= self.capacity:
            return [needed]
        order = sorted(needed, key=lambda e: not self.slots.is_resident(e))
        return [order[i : i + self.capacity] for i in range(0, len(order), self.capacity)]

    def first_residents(self) -> list[int]:
        """The experts a new committee starts with, slot i holding expert i."""
        return list(range(self.capacity))

    def loads(self, wanted: list[int]) -> list[tuple[int, int]]:
        """(expert, slot) for each wanted expert that is missing, into the victims of the rest."""
        missing = [e for e in wanted if not self.slots.is_resident(e)]
        return list(zip(missing, self.victims(set(wanted)), strict=False)) if missing else []

    def plan_swaps(self, limit: int, evict: bool = True) -> list[tuple[int, int, int]]:
        """(expert in, slot, expert out) pairs that raise the committee's rank by a margin, best first.

        ``evict=False``: only fill empty slots (expert out -1); with none, nothing is ranked at all.
        """
        held = self.slots.slot_to_expert
        empty = [s for s, e in enumerate(held) if e < 0]
        if self.slots.full or not (empty or evict):
            return []
        rank = self.rank()
        resident = sorted((s for s, e in enumerate(held) if e >= 0 and evict), key=lambda s: float(rank[held[s]]))
        outside = sorted((e for e in range(self.num_experts) if not self.slots.is_resident(e)),
                         key=lambda e: -float(rank[e]))
        plan: list[tuple[int, int, int]] = []
        for expert, slot in zip(outside, empty + resident, strict=False):
            if len(plan) >= limit:
                break
            victim = held[slot]
            if victim >= 0 and float(rank[expert]) <= SWAP_HYSTERESIS * float(rank[victim]) + 1e-12:
                break
            plan.append((expert, slot, victim))
        return plan

    def shrink_order(self) -> list[int]:
        """Slots best kept first (the highest ranked experts), empty ones last."""
        rank = self.rank()
        held = self.slots.slot_to_expert
        return sorted(range(self.capacity), key=lambda s: (held[s] < 0, -float(rank[max(held[s], 0)])))
