"""The background swapper: keeps each committee's most important experts resident.

Reading an expert (disk or RAM tier) happens outside the step lock; only the copy into the slot
is done under it, between tokens, so generation waits at most for one expert copy. On CUDA the
copy runs on the swapper's own stream from a pinned staging buffer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from .committee import Committee, Runtime
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
        self._staging: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
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
        """One round over every layer; returns the number of swaps applied."""
        done = 0
        for committee in self.committees:
            with self.runtime.lock:
                plan, version = committee.plan_swaps(self.swaps_per_layer), committee.version
            for expert, slot, victim in plan:
                if self._stop.is_set():
                    return done
                start = time.perf_counter()
                tensors = self._stage(self.store.read(committee.layer, expert))
                with self.runtime.lock:
                    if (committee.version != version or committee.slot_to_expert[slot] != victim
                            or expert in committee.resident_experts):
                        continue
                    committee.apply_swap(expert, slot, tensors, "grow" if victim < 0 else "prefetch", start,
                                         self.stream)
                done += 1
        self.swaps += done
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if self.enabled and not self.runtime.pinned and not self._stop.is_set():
                while self.run_once() and not self._wake.is_set() and not self._stop.is_set():
                    pass

    def _stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On CUDA, pageable host tensors go through reused pinned buffers so the copy can be async."""
        if self.stream is None:
            return tensors
        staged = {}
        for name, tensor in tensors.items():
            if tensor.is_pinned():
                staged[name] = tensor
                continue
            key = (name, tuple(tensor.shape), tensor.dtype)
            if key not in self._staging:
                self._staging[key] = torch.empty(tensor.shape, dtype=tensor.dtype).pin_memory()
            staged[name] = self._staging[key].copy_(tensor)
        return staged
