"""The committee: C of a layer's E experts resident in slots, in the model's own parameter layout.

It replaces a transformers experts module. The router still runs untouched; the committee only
remaps the expert ids it returns onto slots and calls the original experts forward, so every
family's quirks (biases, clamped SwiGLU, transposed weights) keep working. Misses are handled by
the runtime's policy before the layer computes. Routing-only bookkeeping (importance, hit counts,
substitution, skipping) stays on the device: no host sync unless an expert must be loaded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from expertswap.engine.moe.copier import Copier
from expertswap.engine.moe.expert_cache import ExpertCache
from expertswap.engine.moe.expert_rows import routed_pairs, slot_weights, supports_rows
from expertswap.engine.moe.host_compute import HostExperts
from expertswap.engine.moe.policies import substitute_misses
from expertswap.engine.moe.runtime import Runtime
from expertswap.engine.moe.slot_map import SlotMap
from expertswap.engine.moe.slot_storage import RowSlots, StackedSlots
from expertswap.engine.observe.counters import RoutingCounts
from expertswap.engine.weights.compat import experts_implementation, foreach_norm, set_expert_parallel
from expertswap.engine.weights.packed import packing_pays
from expertswap.engine.weights.store import ExpertStore, LayerExperts
from expertswap.protocol.events import SwapEvent
from expertswap.protocol.plan import LayerShape


class Swap(NamedTuple):
    """One expert to copy into a slot; ``tensors`` are its weights on the host, ``reason`` goes to the event."""

    expert: int
    slot: int
    tensors: dict[str, torch.Tensor]
    reason: str  # miss | prefetch | grow


class Committee(nn.Module):
    """Resident slots for one MoE layer plus the expert <-> slot maps and importance scores."""

    def __init__(
        self,
        inner: nn.Module,
        spec: LayerExperts,
        store: ExpertStore,
        runtime: Runtime,
        capacity: int,
        device: torch.device,
        router: nn.Module | None,
        copier: Copier,
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
        self.cache = ExpertCache(self.num_experts, spec.top_k, capacity, device, runtime.eviction)
        self._norm_known = [False] * self.num_experts
        self._norms_unsure: set[int] = set()  # learnt by the last settle, unless the step after moved them out
        self.version = 0  # bumped by resize: a swap planned against an older layout is dropped
        self._router_logits: torch.Tensor | None = None
        self._host: HostExperts | None = None
        self._sentinel_ok = experts_implementation(inner.config) in ("grouped_mm", "batched_mm")
        set_expert_parallel(inner, self._sentinel_ok)
        if router is not None:
            router.register_forward_hook(self._capture_router_logits)
        if (device.type == "cpu" or spec.quantize is not None) and supports_rows(inner):
            packed = packing_pays(device, spec.params[0].dtype)
            self.storage: StackedSlots | RowSlots = RowSlots(inner, spec, packed, device)
        else:
            self.storage = StackedSlots(inner, spec, device, copier)
        self.storage.allocate(capacity)
        for slot, expert in enumerate(self.cache.first_residents()):  # one at a time: the host holds one of them
            first = Swap(expert, slot, self.store.read(self.layer, expert), "grow")
            self.storage.write([(slot, first.tensors)])()
            self._learn_norms([first])
            self.slots.install(slot, expert)
            self._hand_over([expert], {})
        self.slots.publish()

    def release(self) -> None:
        """Drop every slot and host copy (the engine is closing): nothing is resident after, and the counts of
        what happened stay for a last ``stats()``."""
        self.storage.allocate(0)
        self.cache.slots = SlotMap(self.num_experts, 0)
        self._host, self._router_logits = None, None

    # ---- what is resident ---------------------------------------------------------------------
    @property
    def slots(self) -> SlotMap:
        return self.cache.slots

    @property
    def routing(self) -> RoutingCounts:
        return self.cache.routing

    @property
    def shape(self) -> LayerShape:
        """What the planner knows of this layer."""
        return self.spec.shape

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def resident_experts(self) -> list[int]:
        return self.slots.resident_experts

    @property
    def resident_bytes(self) -> int:
        """Bytes the slot weights really occupy, read off the tensors themselves."""
        return self.storage.nbytes

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        self.runtime.active_layers += 1
        try:
            return self._forward(hidden, top_k_index, top_k_weights)
        finally:
            self.runtime.active_layers -= 1

    def _forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        index, weights, resident = self.observe(hidden, index, weights)
        if self.slots.full:
            return self.compute(hidden, index, weights)
        if not runtime.allow_loads:
            out = runtime.policy.without_loads(self, hidden, index, weights, resident)
            if out is not None:
                return out
        needed = self.cache.needed(index)
        if len(needed) <= self.capacity:
            self.make_resident(needed)
            return self.compute(hidden, index, weights)
        return self._run_in_passes(hidden, index, weights, needed)

    def observe(self, hidden: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing bookkeeping, before any load (``ExpertCache.observe`` weighing each token by |x|)."""
        runtime = self.runtime
        if runtime.trace is not None:
            runtime.trace.note(self.layer, index, weights)
        return self.cache.observe(index, weights, hidden, runtime.policy.routing_threshold)

    def compute(self, hidden: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts' output for a routing whose experts are resident; ids < 0 contribute nothing."""
        return self._pairs(hidden, expert_index, weights).sum(dim=1).to(hidden.dtype)

    def _run_in_passes(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, needed: list[int]
    ) -> torch.Tensor:
        """More experts needed than slots (a long prompt at a small budget): compute in groups of C."""
        groups = self.cache.passes(needed)
        self.runtime.counters.extra_passes += len(groups) - 1
        pairs: torch.Tensor | None = None
        for group in groups:
            self.make_resident(group)
            member = torch.zeros(self.num_experts, dtype=torch.bool, device=index.device)
            member[group] = True
            part = self._pairs(hidden, index.masked_fill(~member[index.clamp(min=0)], -1), weights)
            pairs = part if pairs is None else pairs + part  # each pair is non-zero in exactly one pass
        assert pairs is not None
        return pairs.sum(dim=1).to(hidden.dtype)  # one reduction over k, as a single pass does it

    def _pairs(self, hidden: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[T, k, H]: each routed (token, expert) pair's weighted output, zero for ids < 0 or not resident.

        Every result is the sum of these over k in routing order, so neither slot placement nor the
        number of passes changes a bit. Stacked slots run the family's experts forward once, on T*k
        single-expert rows.
        """
        rows, width = expert_index.shape
        slot = self.slots.device_map[expert_index.clamp(min=0)]
        dropped = (expert_index < 0) | (slot < 0)
        if isinstance(self.storage, RowSlots):
            return routed_pairs(self.inner, self.storage.weights, hidden, slot.masked_fill(dropped, -1).tolist(),
                                weights, self.storage.int8_inputs)
        pair_hidden = hidden.repeat_interleave(width, dim=0)
        if self._sentinel_ok:  # grouped_mm skips sentinel ids: no host sync, capturable
            flat = self.inner(pair_hidden, slot.masked_fill(dropped, self.capacity).reshape(-1, 1),
                              weights.masked_fill(dropped, 0).reshape(-1, 1))
        else:  # an eager forward groups rows per expert: give it only the live pairs, or slot 0's rows change
            live = (~dropped).reshape(-1).nonzero().squeeze(1)
            flat = torch.zeros_like(pair_hidden)
            flat[live] = self.inner(pair_hidden[live], slot.reshape(-1, 1)[live], weights.reshape(-1, 1)[live])
        return flat.view(rows, width, -1)

    def run_substituted(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                        resident: torch.Tensor) -> torch.Tensor:
        """``substitute`` policy: each miss computed by a resident expert instead."""
        self.routing.substituted += ((index >= 0) & ~resident).sum()
        return self.compute(hidden, self._substitute(index, resident), weights)

    def run_with_host(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, resident: torch.Tensor
    ) -> torch.Tensor:
        """``cpu`` policy: resident experts on the device, misses on the CPU from their host copy."""
        out = self.compute(hidden, index.masked_fill(~resident, -1), weights)  # queued on the GPU, runs meanwhile
        missing = (index >= 0) & ~resident
        host_index, host_missing = index.cpu(), missing.cpu()
        if not bool(host_missing.any()):
            return out
        if self._host is None:
            self._host = HostExperts(self.inner, self.spec)
        host_hidden, host_weights = hidden.cpu(), weights.cpu()
        extra = torch.zeros_like(host_hidden)
        for expert in torch.unique(host_index[host_missing]).tolist():
            rows, cols = ((host_index == expert) & host_missing).nonzero(as_tuple=True)
            y = self._host.compute(self.spec.plain(self.store.read(self.layer, expert)), host_hidden[rows])
            extra.index_add_(0, rows, (y * host_weights[rows, cols, None]).to(extra.dtype))
            self.runtime.counters.cpu_computed += int(rows.numel())
        return out + extra.to(out.device, non_blocking=True)

    def run_low_precision(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, resident: torch.Tensor
    ) -> torch.Tensor:
        """``lowbit`` policy (HOBBIT's idea): misses computed from their nf4 copy, nothing loaded or evicted."""
        pairs = self._pairs(hidden, index.masked_fill(~resident, -1), weights)
        missing = index.masked_fill(resident | (index < 0), -1).tolist()  # one host sync
        experts = sorted({e for row in missing for e in row if e >= 0})
        if experts:
            plain = {e: slot_weights(self.inner, {name: t.to(self.device, non_blocking=True) for name, t in
                                                  self.store.low_precision(self.layer, e).items()}) for e in experts}
            pairs = pairs + routed_pairs(self.inner, plain.__getitem__, hidden, missing, weights).to(pairs.dtype)
            self.runtime.counters.low_precision += sum(e >= 0 for row in missing for e in row)
        return pairs.sum(dim=1).to(hidden.dtype)  # each pair from one of the two: one reduction over k

    # ---- policies on the device ----------------------------------------------------------------
    def _substitute(self, index: torch.Tensor, resident: torch.Tensor) -> torch.Tensor:
        """Scores from this token's router logits when captured, else the layer's importance."""
        logits = self._router_logits
        if logits is not None and logits.shape[0] == index.shape[0]:
            scores = logits.detach().float()
        else:
            scores = self.cache.importance.expand(index.shape[0], -1)
        return substitute_misses(index, resident, scores, self.slots.device_map >= 0)

    def _capture_router_logits(self, _module: nn.Module, _inputs: object, output: object) -> None:
        self._router_logits = output[0] if isinstance(output, tuple) else None

    # ---- loading and swapping (the caller holds the runtime lock) -------------------------------
    def make_resident(self, wanted: list[int]) -> None:
        """Load the wanted experts that are missing into the cache's victims (never a wanted one)."""
        loads = self.cache.loads(wanted)
        if not loads:
            return
        start = time.perf_counter()
        self.apply_swaps([Swap(expert, slot, self.store.read(self.layer, expert), "miss") for expert, slot in loads],
                         start)

    @torch.inference_mode()
    def apply_swaps(self, swaps: Sequence[Swap], start: float, background: bool = False) -> None:
        """Copy experts into slots as one batch and update the maps; only between layers, under the runtime lock.

        The copier queues the batch (on its own stream when ``background``); the bookkeeping runs
        while it transfers; one synchronisation per batch. Each event's ``ms`` is the batch's time
        (from ``start``, reads included) over its size.
        """
        if not swaps:
            return
        if self.runtime.active_layers and any(swap.reason != "miss" for swap in swaps):
            self.runtime.swaps_during_forward += 1
        leaving = self._leaving([swap.slot for swap in swaps])
        finish = self.storage.write([(swap.slot, swap.tensors) for swap in swaps], background)
        self._learn_norms(swaps)
        evicted = [self.slots.install(swap.slot, swap.expert) for swap in swaps]
        finish()
        self._hand_over([swap.expert for swap in swaps], leaving)
        self.slots.publish()
        self._record(swaps, evicted, (time.perf_counter() - start) * 1000 / len(swaps))

    def settle(self, placed: Sequence[tuple[int, int, int]]) -> None:
        """The host follows what a host-free decode step brought in (its log's rows: expert, slot, expert out).

        The device's maps and slots already hold them; the host's maps, the norms, the counts and the
        events catch up. Their ``ms`` is 0: the copy was the kernel's own read of the expert.

        A step queued ahead may already have moved an expert out of its slot again: its norm is then written
        only where the slot still holds it when the device gets there, and learnt anew next time if this
        log shows the step after moved it out.
        """
        swaps = [Swap(expert, slot, {}, "miss") for expert, slot, _ in placed]
        evicted = [self.slots.install(swap.slot, swap.expert) for swap in swaps]
        if evicted != [old for *_, old in placed]:
            raise RuntimeError(f"layer {self.layer}: the host's slot map no longer follows the device's")
        for old in self._norms_unsure.intersection(evicted):
            self._norm_known[old] = False
        self._norms_unsure = {swap.expert for swap in swaps if not self._norm_known[swap.expert]}
        self._learn_norms(swaps, where_held=True)
        self._record(swaps, evicted, 0.0)

    def _record(self, swaps: Sequence[Swap], evicted: Sequence[int], ms: float) -> None:
        self.runtime.counters.loads += len(swaps)
        self.runtime.counters.bytes_loaded += self.spec.expert_bytes * len(swaps)
        for swap, old in zip(swaps, evicted, strict=True):
            self.runtime.telemetry.emit(SwapEvent(layer=self.layer, expert_in=swap.expert, expert_out=old,
                                                  bytes=self.spec.expert_bytes, ms=ms, reason=swap.reason))

    @torch.inference_mode()
    def resize(self, capacity: int) -> None:
        """Change the number of slots, keeping the highest ranked residents; new slots start empty."""
        if capacity == self.capacity:
            return
        held = self.slots.slot_to_expert
        order = self.cache.shrink_order()
        kept, evicted = order[:capacity], order[capacity:]
        for slot in evicted:
            expert = held[slot]
            if expert >= 0:
                self.runtime.telemetry.emit(SwapEvent(layer=self.layer, expert_in=-1, expert_out=expert,
                                                      bytes=self.spec.expert_bytes, ms=0.0, reason="shrink"))
        self._hand_over([], self._leaving(evicted))
        self.storage.reshape(kept, capacity)
        self.slots.reshape(kept, capacity)
        self.slots.publish()
        self.version += 1

    def _leaving(self, slots: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """The experts in these slots as the store keeps them, where the slots hold lent experts (int8): taken
        before the slots are overwritten."""
        storage = self.storage
        if not isinstance(storage, RowSlots) or not storage.lends:
            return {}
        held = self.slots.slot_to_expert
        return {held[s]: storage.portable(s) for s in slots if held[s] >= 0}

    def _hand_over(self, arrived: Sequence[int], leaving: dict[int, dict[str, torch.Tensor]]) -> None:
        """Lent experts: those that left their slots go back to the store, those that arrived leave it."""
        if not self.storage.lends:
            return
        for expert, tensors in leaving.items():
            self.store.take_back(self.layer, expert, tensors)
        for expert in arrived:
            self.store.lend(self.layer, expert)

    def _learn_norms(self, swaps: Sequence[Swap], where_held: bool = False) -> None:
        """|expert| of the newly seen experts, from their slots on the device in one fused kernel.

        Queued behind the copies; a host-side norm cost more than the copy itself. ``where_held``: written only
        where the device's slot still holds the expert when the kernel runs.
        """
        new = [swap for swap in swaps if not self._norm_known[swap.expert]]  # distinct experts
        if not new:
            return
        views = [view for swap in new for view in self.storage.views(swap.slot, swap.tensors)]
        norms = torch.stack(foreach_norm(views)).view(len(new), -1).square().sum(1).sqrt()
        experts = torch.tensor([swap.expert for swap in new], device=self.device)
        if where_held:
            slots = torch.tensor([swap.slot for swap in new], device=self.device)
            norms = torch.where(self.slots.device_slots[slots] == experts, norms, self.cache.norms[experts])
        self.cache.norms.index_copy_(0, experts, norms)
        for swap in new:
            self._norm_known[swap.expert] = True
