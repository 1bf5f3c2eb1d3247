"""One decode token's experts with no host in the loop: misses read from pinned host memory by the kernel itself.

The exact policy on the host reads a layer's routing back (a sync), copies the missing experts into
victim slots, then computes: 40 syncs a token on the OLMoE shape at 50%. Here everything is device work a
CUDA graph replays: ``ExpertCache.place`` gives each missing expert its victim slot in the device's maps,
and the kernels (``kernels.swiglu_pairs``) read each routed expert from its slot, or a missing one from
its pinned host copy while writing it into its new slot. The host learns what moved once per token, from
the layer's log (``Committee.settle``). Same bytes, same arithmetic, same order: a miss gives the bits a
hit gives, so every budget decodes the tokens of 100%.

Needs: the slots as the experts module's stacked [C, 2I, H] / [C, H, I] parameters (bf16 or fp16), a SiLU
gate, no biases, and every expert of the layer in the pinned RAM tier (``ram_tier=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from expertswap.engine.moe.slot_storage import StackedSlots

if TYPE_CHECKING:
    from expertswap.engine.moe.committee import Committee

_NAMES = ("gate_up_proj", "down_proj")


def supports(committee: Committee) -> bool:
    """Whether this committee's experts can be computed by the zero-copy kernels."""
    spec, inner = committee.spec, committee.inner
    shapes = {p.name: p.shape for p in spec.params}
    if (not isinstance(committee.storage, StackedSlots) or set(shapes) != set(_NAMES) or spec.quantize is not None
            or committee.device.type != "cuda" or spec.params[0].dtype not in (torch.bfloat16, torch.float16)):
        return False
    (double, hidden), (hidden_out, intermediate) = shapes["gate_up_proj"], shapes["down_proj"]
    if double != 2 * intermediate or hidden_out != hidden or getattr(inner.config, "hidden_act", None) != "silu":
        return False
    return all(committee.store.pinned(committee.layer, e) for e in range(committee.num_experts))


class ZeroCopyExperts:
    """A committee's batch-1 experts through the kernels; the addresses of its experts' host copies on the device."""

    def __init__(self, committee: Committee, log: torch.Tensor) -> None:
        self.committee = committee
        self.log = log  # [k, 3]: what each token brings in (``ExpertCache.place``'s rows), read by the host after it
        shapes = {p.name: p.shape for p in committee.spec.params}
        self.intermediate = shapes["down_proj"][1]
        copies = [committee.store.read(committee.layer, e) for e in range(committee.num_experts)]
        self.host = {name: torch.tensor([c[name].data_ptr() for c in copies], dtype=torch.long,
                                        device=committee.device) for name in _NAMES}

    def __call__(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[1, H] for one token ``hidden`` [1, H] routed to ``index`` [1, k] with ``weights`` [1, k]."""
        from expertswap.engine.moe.kernels import swiglu_pairs  # Triton: only where a GPU is

        committee = self.committee
        assert isinstance(committee.storage, StackedSlots)  # ``supports`` said so
        experts = index[0]
        if committee.slots.full:
            fill = torch.full_like(experts, -1)
        else:
            placed = committee.cache.place(index)  # rows sorted by expert; back to routing order below
            self.log.copy_(placed)
            order = experts.sort().indices
            fill = torch.empty_like(experts).index_copy_(0, order, placed[:, 1])
        slot = committee.slots.device_map[experts]
        addresses = []
        for name in _NAMES:
            slots = committee.storage.tensors()[name]
            base, stride = slots.data_ptr(), slots[0].numel() * slots.element_size()
            at_slot = base + slot * stride
            source = torch.where(fill >= 0, self.host[name][experts], at_slot)
            addresses.append((source, torch.where(fill >= 0, at_slot, 0)))
        pairs = swiglu_pairs(hidden[0], addresses[0], addresses[1], weights[0], self.intermediate)
        return pairs.sum(dim=0, keepdim=True)
