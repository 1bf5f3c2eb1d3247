"""The background swapper: keeps each committee's most important experts resident.

Reading experts (disk or RAM tier) happens outside the step lock; only the copies into the slots
are done under it, between tokens, one layer's few swaps as one batch, so generation waits at most
for that batch. On CUDA the copies run on the swapper's own stream from pinned memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from .committee import Committee, Runtime, Swap
from .store import ExpertStore


class Swapper:
    """A daemon thread woken after every token and every budget change."""

    def __init__(
        self, committees: Sequence[Committee], store: ExpertStore, runtime: Runtime, device: torch.device,
        swaps_per_layer: int = 2,
    ) -> None:
        self.committees = committees
        self.store = store
        self.runtime = runtime
        self.swaps_per_layer = swaps_per_layer
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.enabled = True
        self.swaps = 0
        self._staging: dict[tuple[str, tuple[int, ...], torch.dtype, int], torch.Tensor] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expertswap-swapper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        self._wake.set()

    def run_once(self) -> int:
        """One round over every layer, each layer's swaps as one batch; returns the number applied."""
        done = 0
        for committee in self.committees:
            if self._stop.is_set():
                break
            with self.runtime.lock:
                plan, version = committee.plan_swaps(self.swaps_per_layer), committee.version
            if not plan:
                continue
            start = time.perf_counter()
            staged = [(victim, Swap(expert, slot, self._stage(self.store.read(committee.layer, expert), n),
                                    "grow" if victim < 0 else "prefetch"))
                      for n, (expert, slot, victim) in enumerate(plan)]
            with self.runtime.lock:
                if committee.version != version:
                    continue
                batch = [swap for victim, swap in staged if committee.slots.slot_to_expert[swap.slot] == victim
                         and swap.expert not in committee.resident_experts]
                committee.apply_swaps(batch, start, self.stream)
            done += len(batch)
        self.swaps += done
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if self.enabled and not self.runtime.pinned and not self._stop.is_set():
                while self.run_once() and not self._wake.is_set() and not self._stop.is_set():
                    pass

    def _stage(self, tensors: dict[str, torch.Tensor], position: int) -> dict[str, torch.Tensor]:
        """On CUDA, pageable host tensors go through pinned buffers (one set per place in a batch) for async copies."""
        if self.stream is None:
            return tensors
        staged = {}
        for name, tensor in tensors.items():
            if tensor.is_pinned():
                staged[name] = tensor
                continue
            key = (name, tuple(tensor.shape), tensor.dtype, position)
            if key not in self._staging:
                self._staging[key] = torch.empty(tensor.shape, dtype=tensor.dtype).pin_memory()
            staged[name] = self._staging[key].copy_(tensor)
        return staged
