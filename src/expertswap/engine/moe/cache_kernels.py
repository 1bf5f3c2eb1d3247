"""One Triton program each for a decode token's routing bookkeeping and slot placement (``ExpertCache``).

At batch 1 a layer is launch-bound: in torch, ``observe`` is about 20 kernels of a few bytes each and
``place`` about 70 (sorts, scans, scatters), per MoE layer and token. Each is one program here, doing for
one token what the torch code does, in the same order: the same counts, stamps and decisions (a CUDA test
compares them over random states); importance the same but for |x|, whose squares are summed in
another order. Imported only where Triton is (CUDA machines).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EVICTION_CODES = {"importance": 0, "lru": 1, "lfu": 2}


@triton.jit
def _observe_kernel(hidden_ptr, index_ptr, weights_ptr, importance_ptr, frequency_ptr, routed_ptr, last_used_ptr,
                    clock_ptr, last_token_ptr, map_ptr, counts_ptr, resident_ptr, width, experts, decay,
                    K: tl.constexpr, EVICTION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    squares = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, width, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        x = tl.load(hidden_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
        squares += x * x
    signal = tl.sqrt(tl.sum(squares, axis=0))
    e = tl.arange(0, BLOCK_E)
    live = e < experts
    importance = tl.load(importance_ptr + e, mask=live, other=0.0) * decay
    routed = tl.load(routed_ptr + e, mask=live, other=0)
    frequency = tl.load(frequency_ptr + e, mask=live, other=0.0)
    if EVICTION == 2:
        frequency = frequency * decay
    last_used = tl.load(last_used_ptr + e, mask=live, other=0)
    clock = tl.load(clock_ptr)
    if EVICTION == 1:
        clock += 1
    hits = tl.load(counts_ptr)
    misses = tl.load(counts_ptr + 1)
    for j in tl.static_range(K):
        expert = tl.load(index_ptr + j)
        valid = expert >= 0
        chosen = (e == expert) & valid
        importance = tl.where(chosen, importance + tl.load(weights_ptr + j).to(tl.float32) * signal, importance)
        routed = tl.where(chosen, routed + 1, routed)
        if EVICTION == 2:
            frequency = tl.where(chosen, frequency + 1.0, frequency)
        if EVICTION == 1:
            last_used = tl.where(chosen, tl.maximum(last_used, clock), last_used)
        tl.store(last_token_ptr + j, expert)
        resident = valid & (tl.load(map_ptr + tl.maximum(expert, 0)) >= 0)
        tl.store(resident_ptr + j, resident)
        hits += resident.to(tl.int64)
        misses += (valid & ~resident).to(tl.int64)
    tl.store(importance_ptr + e, importance, mask=live)
    tl.store(routed_ptr + e, routed, mask=live)
    if EVICTION == 2:
        tl.store(frequency_ptr + e, frequency, mask=live)
    if EVICTION == 1:
        tl.store(last_used_ptr + e, last_used, mask=live)
        tl.store(clock_ptr, clock)
    tl.store(counts_ptr, hits)
    tl.store(counts_ptr + 1, misses)


def observe(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, importance: torch.Tensor,
            frequency: torch.Tensor, routed: torch.Tensor, last_used: torch.Tensor, clock: torch.Tensor,
            last_token: torch.Tensor, slot_map: torch.Tensor, counts: torch.Tensor, eviction: str,
            decay: float) -> torch.Tensor:
    """``ExpertCache.observe`` for one token (``hidden`` [1, H], ``index``/``weights`` [1, k], no skipping):
    the state advanced in place; returns which routed experts are resident [1, k]."""
    experts, k, width = importance.numel(), index.shape[-1], hidden.shape[-1]
    hidden, index, weights = hidden.contiguous(), index.contiguous(), weights.contiguous()
    resident = torch.empty(index.shape, dtype=torch.bool, device=index.device)
    _observe_kernel[(1,)](hidden, index, weights, importance, frequency, routed, last_used, clock, last_token, slot_map,
                          counts, resident, width, experts, decay, K=k, EVICTION=EVICTION_CODES[eviction],
                          BLOCK_H=min(triton.next_power_of_2(width), 4096), BLOCK_E=triton.next_power_of_2(experts))
    return resident


@triton.jit
def _place_kernel(index_ptr, map_ptr, slots_ptr, importance_ptr, frequency_ptr, last_used_ptr, norms_ptr, log_ptr,
                  fill_ptr, capacity, experts, K: tl.constexpr, EVICTION: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    j = tl.arange(0, BLOCK_K)
    routed = tl.load(index_ptr + j, mask=j < K, other=-1)
    current = tl.load(map_ptr + tl.maximum(routed, 0), mask=j < K, other=-1)
    # each routed pair's place in the order of expert ids (a stable sort of the routing)
    before = (routed[None, :] < routed[:, None]) | ((routed[None, :] == routed[:, None]) & (j[None, :] < j[:, None]))
    before = before & (j[None, :] < K)
    order = tl.where(j < K, tl.sum(before.to(tl.int32), axis=1), BLOCK_K)  # padding lanes come nowhere
    c = tl.arange(0, BLOCK_C)
    held = tl.load(slots_ptr + c, mask=c < capacity, other=-1)
    owner = tl.maximum(held, 0)
    if EVICTION == 1:
        rank = tl.load(last_used_ptr + owner, mask=c < capacity, other=0).to(tl.float64)
    elif EVICTION == 2:
        rank = tl.load(frequency_ptr + owner, mask=c < capacity, other=0.0).to(tl.float64)
    else:  # a norm not yet known (the host learns it after the step that brought the expert in): their mean
        e = tl.arange(0, BLOCK_E)
        every = tl.load(norms_ptr + e, mask=e < experts, other=float("nan"))
        known = tl.sum((every == every).to(tl.float32), axis=0)
        mean = tl.sum(tl.where(every == every, every, 0.0), axis=0) / tl.maximum(known, 1.0)
        norm = tl.load(norms_ptr + owner, mask=c < capacity, other=1.0)
        norm = tl.where(norm == norm, norm, tl.where(known > 0, mean, 1.0))
        rank = (tl.load(importance_ptr + owner, mask=c < capacity, other=0.0) * norm).to(tl.float64)
    rank = tl.where(held < 0, -1.0, rank)
    in_use = tl.sum(((c[:, None] == current[None, :]) & (routed[None, :] >= 0) & (j[None, :] < K)).to(tl.int32),
                    axis=1) > 0
    rank = tl.where(in_use | (c >= capacity), float("inf"), rank)
    for p in tl.static_range(K):
        at = order == p
        expert = tl.sum(tl.where(at, routed, 0), axis=0)
        pair = tl.sum(tl.where(at, j, 0), axis=0)
        missing = (tl.sum(tl.where(at, current, 0), axis=0) < 0) & (expert >= 0)
        lowest = tl.min(rank, axis=0)
        victim = tl.min(tl.where(rank == lowest, c, BLOCK_C), axis=0)  # the first of the lowest: a stable sort's
        old = tl.sum(tl.where(c == victim, held, 0), axis=0)
        tl.store(map_ptr + old, -1, mask=missing & (old >= 0))
        tl.store(map_ptr + expert, victim, mask=missing)
        tl.store(slots_ptr + victim, expert, mask=missing)
        rank = tl.where((c == victim) & missing, float("inf"), rank)
        held = tl.where((c == victim) & missing, expert, held)
        tl.store(log_ptr + 3 * p, tl.where(missing, expert, -1))
        tl.store(log_ptr + 3 * p + 1, tl.where(missing, victim, -1))
        tl.store(log_ptr + 3 * p + 2, tl.where(missing, old, -1))
        tl.store(fill_ptr + pair, tl.where(missing, victim, -1))


def place(index: torch.Tensor, slot_map: torch.Tensor, slots: torch.Tensor, importance: torch.Tensor,
          frequency: torch.Tensor, last_used: torch.Tensor, norms: torch.Tensor, log: torch.Tensor,
          eviction: str) -> torch.Tensor:
    """``ExpertCache.place`` for one token ``index`` [1, k]: both maps updated in place, ``log`` [k, 3] written as
    its rows are; returns each routed pair's slot being filled, in routing order (-1 for the resident)."""
    k, capacity = index.shape[-1], slots.numel()
    index = index.contiguous()
    fill = torch.empty(k, dtype=torch.long, device=index.device)
    _place_kernel[(1,)](index, slot_map, slots, importance, frequency, last_used, norms, log, fill, capacity,
                        norms.numel(), K=k, EVICTION=EVICTION_CODES[eviction], BLOCK_K=triton.next_power_of_2(k),
                        BLOCK_C=triton.next_power_of_2(capacity), BLOCK_E=triton.next_power_of_2(norms.numel()))
    return fill
