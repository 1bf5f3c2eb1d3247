"""The one door every engine forward goes through.

Lock discipline, in one place: the runtime's step lock (an RLock) is held for the whole of a forward
and for anything that changes what a forward sees (a resize, a swap batch, a policy switch, a pinned
committee, a residency snapshot). Budget and policy requests from other threads only record what is
wanted; the next step applies them here, between tokens, under the lock. Background copies (the
swapper) read and stage outside the lock and take it only to install a batch. Nothing else takes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers import DynamicCache

from .errors import OutOfMemoryError
from .generation import forward_mode

T = TypeVar("T")


class StepGuard:
    """Runs a forward under the step lock and forward mode, after ``before_step``; retries it after an OOM."""

    def __init__(self, lock: threading.RLock, before_step: Callable[[bool], None],
                 on_oom: Callable[[BaseException], bool]) -> None:
        self.lock = lock
        self.before_step = before_step
        self.on_oom = on_oom
        self.steps = 0  # forwards run, retries included: tests read it to see that every forward came here

    def run(self, forward: Callable[[], T], is_prefill: bool, cache: DynamicCache | None = None) -> T:
        """``forward()`` once it succeeds; a failed attempt is rolled back out of ``cache`` before the retry.

        Retries while ``on_oom(error)`` says it freed memory (a smaller budget); otherwise ``OutOfMemoryError``.
        """
        lengths = [layer.get_seq_length() for layer in cache.layers] if cache is not None else []
        while True:
            try:
                with self.lock, forward_mode():
                    self.steps += 1
                    self.before_step(is_prefill)
                    return forward()
            except (torch.OutOfMemoryError, MemoryError) as exc:
                if not _roll_back(cache, lengths) or not self.on_oom(exc):
                    raise OutOfMemoryError(f"out of memory even at the smallest budget: {exc}".splitlines()[0]) from exc

    def held(self) -> bool:
        """Whether the calling thread holds the step lock (for assertions in tests and invariants)."""
        return self.lock._is_owned()  # type: ignore[attr-defined]  # RLock's own ownership test


def _roll_back(cache: DynamicCache | None, lengths: list[int]) -> bool:
    """Drop what a failed step appended to each layer of the KV cache; False if a layer cannot be cropped."""
    if cache is None:
        return True
    for layer, before in zip(cache.layers, lengths):
        grown = layer.get_seq_length() - before
        if grown > 0:
            try:
                layer.crop(-grown)
            except RuntimeError:  # a sliding-window layer that no longer keeps its past
                return False
    return True
