"""The committee: C of a layer's E experts resident in slots, in the model's own parameter layout.

It replaces a transformers experts module. The router still runs untouched; the committee only
remaps the expert ids it returns onto slots and calls the original experts forward, so every
family's quirks (biases, clamped SwiGLU, transposed weights) keep working. Misses are handled
by the runtime's policy before the layer computes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .store import ExpertStore, LayerExperts

POLICIES = ("exact", "substitute")
_DECAY = 0.9


@dataclass
class Counters:
    """Routing outcomes since the engine loaded; read by stats and telemetry."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    bytes_loaded: int = 0
    substituted: int = 0
    extra_passes: int = 0


@dataclass
class Runtime:
    """State every committee of one engine shares: the policy, whether misses may load, the counters."""

    policy: str = "exact"
    allow_loads: bool = True
    counters: Counters = field(default_factory=Counters)
    lock: threading.RLock = field(default_factory=threading.RLock)


class Committee(nn.Module):
    """Resident slots for one MoE layer plus the expert <-> slot maps."""

    def __init__(
        self,
        inner: nn.Module,
        spec: LayerExperts,
        store: ExpertStore,
        runtime: Runtime,
        capacity: int,
        device: torch.device,
        router: nn.Module | None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.spec = spec
        self.layer = spec.layer
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        self.store = store
        self.runtime = runtime
        self.device = device
        self.importance = torch.zeros(self.num_experts)
        self.expert_to_slot = torch.full((self.num_experts,), -1, dtype=torch.long, device=device)
        self._slot_of = [-1] * self.num_experts
        self.slot_to_expert: list[int] = []
        self._router_logits: torch.Tensor | None = None
        if router is not None:
            router.register_forward_hook(self._capture_router_logits)
        self._allocate(capacity)
        for slot in range(capacity):
            self._load(slot, slot)

    @property
    def capacity(self) -> int:
        return len(self.slot_to_expert)

    @property
    def resident_experts(self) -> list[int]:
        return [e for e in self.slot_to_expert if e >= 0]

    @property
    def resident_bytes(self) -> int:
        """Bytes the slot tensors really occupy, read off the parameters themselves."""
        return sum(getattr(self.inner, p.name).nbytes for p in self.spec.params)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        index = top_k_index.to("cpu")
        self._note_usage(index, top_k_weights)
        slot_of = torch.tensor(self._slot_of)
        hit = slot_of[index] >= 0
        counters = self.runtime.counters
        counters.hits += int(hit.sum())
        counters.misses += int((~hit).sum())
        if bool(hit.all()):
            return self._run(hidden, top_k_index, top_k_weights)
        if self.runtime.policy == "substitute" and not self.runtime.allow_loads:
            counters.substituted += int((~hit).sum())
            return self._run(hidden, self._substitute(index, hit).to(top_k_index.device), top_k_weights)
        needed = torch.unique(index).tolist()
        if len(needed) <= self.capacity:
            self._make_resident(needed)
            return self._run(hidden, top_k_index, top_k_weights)
        return self._run_in_passes(hidden, top_k_index, top_k_weights, needed)

    def _run(self, hidden: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden, self.expert_to_slot[expert_index], weights)

    def _run_in_passes(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor, needed: list[int]
    ) -> torch.Tensor:
        """More experts needed than slots (a long prompt at a small budget): compute in groups of C."""
        order = sorted(needed, key=lambda e: self._slot_of[e] < 0)  # resident ones first: fewer loads
        groups = [order[i : i + self.capacity] for i in range(0, len(order), self.capacity)]
        self.runtime.counters.extra_passes += len(groups) - 1
        out: torch.Tensor | None = None
        for group in groups:
            self._make_resident(group)
            member = torch.zeros(self.num_experts, dtype=torch.bool, device=top_k_index.device)
            member[group] = True
            inside = member[top_k_index]
            part = self._run(
                hidden,
                torch.where(inside, top_k_index, group[0]),
                torch.where(inside, weights, torch.zeros_like(weights)),
            )
            out = part if out is None else out + part
        assert out is not None
        return out

    def _make_resident(self, wanted: list[int]) -> None:
        """Load the wanted experts that are missing into the least important slots not wanted now."""
        missing = [e for e in wanted if self._slot_of[e] < 0]
        if not missing:
            return
        keep = set(wanted)
        free = [s for s, e in enumerate(self.slot_to_expert) if e not in keep]
        free.sort(key=lambda s: -1.0 if self.slot_to_expert[s] < 0 else float(self.importance[self.slot_to_expert[s]]))
        for expert, slot in zip(missing, free):
            self._load(expert, slot)

    def _load(self, expert: int, slot: int) -> None:
        tensors = self.store.read(self.layer, expert)
        for p in self.spec.params:
            getattr(self.inner, p.name).data[slot].copy_(tensors[p.name])
        old = self.slot_to_expert[slot]
        if old >= 0:
            self._slot_of[old] = -1
            self.expert_to_slot[old] = -1
        self.slot_to_expert[slot] = expert
        self._slot_of[expert] = slot
        self.expert_to_slot[expert] = slot
        self.runtime.counters.loads += 1
        self.runtime.counters.bytes_loaded += self.spec.expert_bytes

    def _allocate(self, capacity: int) -> None:
        for p in self.spec.params:
            slots = torch.empty((capacity, *p.shape), dtype=p.dtype, device=self.device)
            self.inner.register_parameter(p.name, nn.Parameter(slots, requires_grad=False))
        self.inner.num_experts = capacity
        self.slot_to_expert = [-1] * capacity

    def _note_usage(self, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Decayed routing mass per expert: which residents are least useful when a slot is needed."""
        self.importance.mul_(_DECAY).index_add_(0, index.reshape(-1), weights.detach().reshape(-1).float().cpu())

    def _substitute(self, index: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """Map each miss to the resident expert the router ranks highest for that token, unused by it."""
        resident = torch.tensor(self._slot_of) >= 0
        if self._router_logits is not None and self._router_logits.shape[0] == index.shape[0]:
            scores = self._router_logits.detach().float().cpu().clone()
        else:
            scores = self.importance.expand(index.shape[0], -1).clone()
        scores[:, ~resident] = float("-inf")
        taken = torch.zeros_like(scores, dtype=torch.bool)
        for k in range(index.shape[1]):
            rows = hit[:, k].nonzero().flatten()
            taken[rows, index[rows, k]] = True
        out = index.clone()
        for k in range(index.shape[1]):
            rows = (~hit[:, k]).nonzero().flatten()
            if rows.numel() == 0:
                continue
            choice = scores[rows].masked_fill(taken[rows], float("-inf")).argmax(dim=1)
            out[rows, k] = choice
            taken[rows, choice] = True
        return out

    def _capture_router_logits(self, _module: nn.Module, _inputs: object, output: object) -> None:
        self._router_logits = output[0] if isinstance(output, tuple) else None
