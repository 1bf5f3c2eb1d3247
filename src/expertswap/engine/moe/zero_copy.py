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
        copies = [committee.store.read(committee.layer, e) for e in range(committee.num_experts)]
        gate_up, down = (torch.tensor([c[name].data_ptr() for c in copies], dtype=torch.long, device=committee.device)
                         for name in _NAMES)
        self.host = (gate_up, down)  # each expert's matrices in pinned host memory, by address

    def __call__(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                 residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """[1, H] for one token ``hidden`` [1, H] routed to ``index`` [1, k] with ``weights`` [1, k]; with
        ``residual`` (h, out), ``h`` plus that, written into ``out``, in the same kernel as the sum."""
        from expertswap.engine.moe.kernels import sum_pairs, swiglu_pairs  # Triton: only where a GPU is

        committee = self.committee
        assert isinstance(committee.storage, StackedSlots)  # ``supports`` said so
        fill = None if committee.slots.full else committee.cache.place(index, self.log)
        slots = committee.storage.tensors()
        pairs = swiglu_pairs(hidden[0], index[0], fill, committee.slots.device_map, self.host,
                             (slots["gate_up_proj"], slots["down_proj"]), weights[0])
        return sum_pairs(pairs, residual)
