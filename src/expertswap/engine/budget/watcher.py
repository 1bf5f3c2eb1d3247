"""Memory sampling for telemetry, and the optional mode where the budget follows free memory."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil
import torch


def free_memory_probe(device: torch.device) -> Callable[[], int]:
    """Free bytes where the experts live: available RAM on CPU, free VRAM on CUDA."""
    if device.type == "cuda":
        return lambda: int(torch.cuda.mem_get_info(device)[0])
    return lambda: int(psutil.virtual_memory().available)


class MemoryWatcher:
    """Samples memory every ``interval`` seconds; when following, moves the budget to fit free memory.

    The target is what the experts hold now plus what is free, less a safety margin, so the budget
    shrinks when another program takes memory and grows back when it is released.
    """

    def __init__(
        self,
        sample: Callable[[], None],
        retarget: Callable[[int], None],
        probe: Callable[[], int],
        interval: float = 0.5,
    ) -> None:
        self.sample = sample
        self.retarget = retarget
        self.probe = probe
        self.interval = interval
        self.following = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expertswap-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def tick(self) -> None:
        """One sample (and, when following, one budget adjustment)."""
        self.sample()
        if self.following:
            self.retarget(self.probe())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()
