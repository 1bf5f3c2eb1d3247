"""Where a committee's slot weights live: the two layouts, behind one small interface.

``StackedSlots`` (CUDA): [C, ...] parameters on the experts module in the model's own layout, so
the family's experts forward (grouped_mm) runs on them unchanged; copies go through the copier
(streams, staging). ``RowSlots`` (CPU): one weight set per slot, computed by ``expert_rows`` (only
routed experts run, each on its own rows), packed for oneDNN where that pays; int8 experts stay codes
and scales, for the int8 kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from expertswap.engine.moe.copier import Copier
from expertswap.engine.moe.expert_rows import Weights, kernel_matrices, packed_weights, slot_weights
from expertswap.engine.weights.packed import INT8_ACTIVATIONS, Int4Matrix, Int8Matrix, integer_kernel_pays
from expertswap.engine.weights.store import LayerExperts

Writes = Sequence[tuple[int, Mapping[str, torch.Tensor]]]


class StackedSlots:
    """Slots as the experts module's own [C, ...] parameters."""

    lends = False  # its slots are copies: the store keeps its own

    def __init__(self, inner: Any, spec: LayerExperts, device: torch.device, copier: Copier) -> None:
        self.inner, self.spec, self.device, self.copier = inner, spec, device, copier

    def allocate(self, capacity: int) -> None:
        for p in self.spec.params:
            slots = torch.empty((capacity, *p.shape), dtype=p.dtype, device=self.device)
            self.inner.register_parameter(p.name, nn.Parameter(slots, requires_grad=False))
        self.inner.num_experts = capacity
        self.nbytes = sum(t.nbytes for t in self.tensors().values())  # read off the new parameters themselves

    def tensors(self) -> dict[str, torch.Tensor]:
        return {p.name: getattr(self.inner, p.name).data for p in self.spec.params}

    def write(self, writes: Writes, background: bool = False) -> Callable[[], None]:
        """Queue the copies; returns ``finish``, which waits for them."""
        return self.copier.copy(self.tensors(), writes, background)

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        """A slot's weights as the store holds them (to check what a slot really contains)."""
        return {p.name: getattr(self.inner, p.name).data[slot] for p in self.spec.params}

    def views(self, slot: int, _host: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """A slot's weights where they are cheapest to read (its norm is computed on the device)."""
        return [getattr(self.inner, p.name).data[slot] for p in self.spec.params]

    def reshape(self, kept: Sequence[int], capacity: int) -> None:
        """``capacity`` slots; old slot ``kept[i]`` becomes slot i."""
        old = self.tensors()
        self.allocate(capacity)
        for new_slot, old_slot in enumerate(kept):
            for name, data in old.items():
                getattr(self.inner, name).data[new_slot].copy_(data[old_slot])


PACK_AFTER_USES = 4  # packing costs ~200 us, each later use saves some: an expert that comes and goes stays plain


class RowSlots:
    """One weight set per slot, packed once it has been used often if ``packed``; an empty slot holds nothing.

    The CPU's slots, and any device's when experts are quantised: a slot then holds the quantised expert,
    dequantised for each forward that routes to it.
    """

    def __init__(self, inner: Any, spec: LayerExperts, packed: bool, device: torch.device) -> None:
        self.inner, self.spec, self.device = inner, spec, device
        self.packed = packed and spec.quantize is None
        # int8 and int4 codes go to their kernels as they lie (rows are output channels unless transposed)
        self.kernels = not inner.is_transposed and integer_kernel_pays(spec.quantize, device, spec.params[0].dtype)
        # an int8 slot holds the store's own codes and scales, which its kernel multiplies as they lie: the store
        # lends them (see Committee._hand_over), so the expert is held once
        self.lends = self.kernels and spec.quantize == "int8"
        self.slots: list[Weights] = []
        self.uses: list[int] = []
        self.sizes: list[int] = []  # each slot's bytes, read off its tensors as they land: counted per token

    @property
    def int8_inputs(self) -> bool:
        """Its experts' matrices quantise their rows for the int8 kernel (``packed.Int8Rows``)."""
        return self.lends and INT8_ACTIVATIONS

    def allocate(self, capacity: int) -> None:
        self.slots = [{} for _ in range(capacity)]
        self.uses = [0] * capacity
        self.sizes = [0] * capacity

    def _hold(self, slot: int, weights: Weights) -> None:
        self.slots[slot] = weights
        self.sizes[slot] = sum(t.nbytes for t in weights.values())  # a kernel's matrix counts its tensors

    def weights(self, slot: int) -> Weights:
        """A slot's weights for a forward; packed in place at its ``PACK_AFTER_USES``-th use."""
        self.uses[slot] += 1
        if self.kernels:
            return self.slots[slot]
        if self.spec.quantize is not None:
            return slot_weights(self.inner, self.spec.plain(self._tensors(slot)))
        if self.packed and self.uses[slot] == PACK_AFTER_USES:
            self._hold(slot, packed_weights(self._tensors(slot)))
        return self.slots[slot]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def write(self, writes: Writes, background: bool = False) -> Callable[[], None]:
        for slot, tensors in writes:
            self._hold(slot, {})  # the old expert's memory goes before the new one's arrives
            on_device = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
            if self.kernels:
                assert self.spec.quantize is not None
                self._hold(slot, kernel_matrices(on_device, self.spec.quantize))
            else:
                self._hold(slot, on_device if self.spec.quantize is not None else slot_weights(self.inner, on_device))
            self.uses[slot] = 0
        return lambda: None

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        if self.kernels:
            return {name: m.plain() if isinstance(m, Int8Matrix | Int4Matrix) else m
                    for name, m in self.slots[slot].items()}
        if self.spec.quantize is not None:
            return self.spec.plain(self._tensors(slot))
        out = {}
        for name, tensor in self._tensors(slot).items():
            plain = tensor.to_dense() if tensor.is_mkldnn else tensor
            out[name] = plain.t() if self.inner.is_transposed and not name.endswith("_bias") else plain
        return out

    def portable(self, slot: int) -> dict[str, torch.Tensor]:
        """An int8 slot's expert as the store keeps it (its own codes and scales), to give it back."""
        out: dict[str, torch.Tensor] = {}
        for name, matrix in self.slots[slot].items():
            if isinstance(matrix, Int8Matrix):
                out[f"{name}.q"], out[f"{name}.scale"] = matrix.codes, matrix.scale
            else:
                assert isinstance(matrix, torch.Tensor)
                out[name] = matrix
        return out

    def views(self, slot: int, host: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The slot's weights as the model computes with them (for |expert|): from ``host``, the expert as it was
        read, where the slot holds a kernel's layout."""
        return list(self.spec.plain(dict(host)).values()) if self.kernels else list(self.read(slot).values())

    def _tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """A slot that holds plain or packed tensors (no kernel's matrices)."""
        tensors = {name: t for name, t in self.slots[slot].items() if isinstance(t, torch.Tensor)}
        assert len(tensors) == len(self.slots[slot])
        return tensors

    def reshape(self, kept: Sequence[int], capacity: int) -> None:
        old, uses = self.slots, self.uses
        self.slots = [old[s] for s in kept] + [{} for _ in range(capacity - len(kept))]
        self.uses = [uses[s] for s in kept] + [0] * (capacity - len(kept))
        self.sizes = [self.sizes[s] for s in kept] + [0] * (capacity - len(kept))
