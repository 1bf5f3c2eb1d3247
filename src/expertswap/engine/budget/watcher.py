"""Memory sampling for telemetry, and the optional mode where the budget follows free memory."""

from __future__ import annotations

import threading

import psutil
import torch

from expertswap.engine.budget.controller import BudgetController
from expertswap.engine.observe.memory import current_rss_bytes
from expertswap.protocol.events import MemorySample, Telemetry


class MemoryWatcher:
    """Samples memory every ``interval`` seconds (a thread ``start`` starts); when following, moves the budget.

    The target is what the experts hold now plus what is free, less a safety margin, so the budget
    shrinks when another program takes memory and grows back when it is released.
    """

    def __init__(self, budget: BudgetController, telemetry: Telemetry, device: torch.device,
                 interval: float = 0.5) -> None:
        self.budget = budget
        self.telemetry = telemetry
        self.device = device
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

    def free_bytes(self) -> int:
        """Free bytes where the experts live: available RAM on CPU, free VRAM on CUDA."""
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return int(psutil.virtual_memory().available)

    def sample(self) -> MemorySample:
        cuda = self.device.type == "cuda"
        return MemorySample(
            rss_bytes=current_rss_bytes(),
            available_ram_bytes=int(psutil.virtual_memory().available),
            cuda_allocated_bytes=torch.cuda.memory_allocated(self.device) if cuda else 0,
            cuda_reserved_bytes=torch.cuda.memory_reserved(self.device) if cuda else 0,
            cuda_free_bytes=int(torch.cuda.mem_get_info(self.device)[0]) if cuda else 0,
            budget_bytes=self.budget.budget_bytes,
            resident_expert_bytes=self.budget.resident_bytes,
            follow_bytes=self.budget.follow_target(self.free_bytes()),
        )

    def publish(self) -> None:
        """A sample to the listeners, if there are any (a reply's start and end get one besides the interval's)."""
        if self.telemetry.active:
            self.telemetry.emit(self.sample())

    def tick(self) -> None:
        """One sample (and, when following, one budget adjustment)."""
        self.publish()
        if self.following:
            self.budget.follow(self.free_bytes())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()
