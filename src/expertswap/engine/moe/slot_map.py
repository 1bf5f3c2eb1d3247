"""Which expert sits in which slot of one layer's committee: the bookkeeping, apart from the weights.

The host keeps both directions (slot -> expert, expert -> slot) and the resident count, always
consistent with each other; the forward reads only the device's copies (``device_map``: expert -> slot,
``device_slots``: slot -> expert, -1 for none), refreshed by ``publish`` after a batch of changes. The
host-free decode step changes the device's copies itself (``ExpertCache.place``) and the host follows
once per token (``install`` of what it logged). Each device copy has one spare entry past its end, a
place for the scatters of a captured step to write what they must drop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SlotMap:
    """The expert <-> slot assignment of one committee; holds no weights, so it is tested on its own."""

    def __init__(self, num_experts: int, capacity: int, device: torch.device | str = "cpu") -> None:
        self.num_experts = num_experts
        self._device = torch.full((num_experts + 1,), -1, dtype=torch.long, device=device)
        self.device_map = self._device[:num_experts]
        self.padded_slots = torch.full((capacity + 1,), -1, dtype=torch.long, device=device)
        self.slot_to_expert: list[int] = [-1] * capacity
        self._slot_of = [-1] * num_experts
        self._resident = 0

    @property
    def capacity(self) -> int:
        return len(self.slot_to_expert)

    @property
    def padded_map(self) -> torch.Tensor:
        """``device_map`` and its spare entry (index ``num_experts``)."""
        return self._device

    @property
    def device_slots(self) -> torch.Tensor:
        """Slot -> expert on the device (-1 empty)."""
        return self.padded_slots[: self.capacity]

    @property
    def full(self) -> bool:
        """Every expert of the layer is resident (nothing can miss)."""
        return self._resident == self.num_experts

    @property
    def empty_slots(self) -> int:
        return self.capacity - self._resident

    @property
    def resident_experts(self) -> list[int]:
        return [e for e in self.slot_to_expert if e >= 0]

    def slot_of(self, expert: int) -> int:
        return self._slot_of[expert]

    def is_resident(self, expert: int) -> bool:
        return self._slot_of[expert] >= 0

    def install(self, slot: int, expert: int) -> int:
        """``slot`` now holds ``expert``; returns the expert it held (-1 if none). ``publish`` afterwards."""
        if self._slot_of[expert] >= 0 and self._slot_of[expert] != slot:
            raise ValueError(f"expert {expert} already sits in slot {self._slot_of[expert]}")
        old = self.slot_to_expert[slot]
        if old >= 0:
            self._slot_of[old] = -1
            self._resident -= 1
        self.slot_to_expert[slot] = expert
        self._slot_of[expert] = slot
        self._resident += 1
        return old

    def reshape(self, kept: Sequence[int], capacity: int) -> None:
        """``capacity`` slots; old slot ``kept[i]`` becomes slot i, the rest are empty. ``publish`` afterwards."""
        if len(kept) > capacity:
            raise ValueError(f"cannot keep {len(kept)} slots in {capacity}")
        old = self.slot_to_expert
        self.slot_to_expert = [-1] * capacity
        self.padded_slots = torch.full((capacity + 1,), -1, dtype=torch.long, device=self.padded_slots.device)
        self._slot_of = [-1] * self.num_experts
        self._resident = 0
        for new_slot, old_slot in enumerate(kept):
            if (expert := old[old_slot]) >= 0:
                self.install(new_slot, expert)

    def publish(self) -> None:
        """The device's maps from the host's, in one copy each (their tensors stay: captured graphs read them)."""
        self.device_map.copy_(torch.tensor(self._slot_of, dtype=torch.long))
        self.device_slots.copy_(torch.tensor(self.slot_to_expert, dtype=torch.long))
