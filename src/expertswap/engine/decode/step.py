"""The one door every engine forward goes through.

Lock discipline, in one place: the runtime's step lock (an RLock) is held for the whole of a forward
and for anything that changes what a forward sees (a resize, a swap batch, a policy switch, a pinned
committee, a residency snapshot). Budget and policy requests from other threads only record what is
wanted; the next step applies them here, between tokens, under the lock. Background copies (the
swapper) read and stage outside the lock and take it only to install a batch. Besides those, only what
reads the committees consistently takes it: a residency snapshot, a new subscription, the stats of a token.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import torch

from expertswap.engine.decode.session import Session
from expertswap.protocol.errors import OutOfMemoryError

T = TypeVar("T")

@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """How every engine forward runs: inference mode, and attention without cuDNN's, which builds a new graph
    for each new sequence length (about 30 ms a decode step on an H100, torch 2.11, ten times the 2-layer step
    it served). Only that one flag flips: ``sdpa_kernel`` sets and restores all five, 40 us of host time a
    token on a 2-core machine, and would switch on a backend the user had switched off."""
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


class StepHooks(Protocol):
    """What runs around every forward, under the step lock: the engine's budget and runtime, seen from here."""

    def before_step(self, is_prefill: bool) -> None:
        """Pending budget changes land, and what the forward may load is set."""

    def after_step(self, is_prefill: bool) -> None:
        """The forward succeeded."""

    def out_of_memory(self, error: BaseException) -> bool:
        """The forward ran out of memory: free some (a smaller budget) and say whether a retry may succeed."""


class StepGuard:
    """Runs a forward under the step lock and forward mode, between ``hooks``; retries it after an OOM."""

    def __init__(self, lock: threading.RLock, hooks: StepHooks) -> None:
        self.lock = lock
        self.hooks = hooks
        self.steps = 0  # forwards run, retries included: tests read it to see that every forward came here

    def run(self, forward: Callable[[], T], is_prefill: bool, session: Session) -> T:
        """``forward()`` once it succeeds; a failed attempt is rolled back out of ``session`` before the retry.

        Retries while ``hooks.out_of_memory(error)`` says it freed memory (a smaller budget); otherwise
        ``OutOfMemoryError``.
        """
        mark = session.mark()
        while True:
            try:
                with self.lock, forward_mode():
                    self.steps += 1
                    self.hooks.before_step(is_prefill)
                    result = forward()
                    self.hooks.after_step(is_prefill)
                    return result
            except (torch.OutOfMemoryError, MemoryError) as exc:
                if not session.roll_back(mark) or not self.hooks.out_of_memory(exc):
                    raise OutOfMemoryError(f"out of memory even at the smallest budget: {exc}".splitlines()[0]) from exc

    def held(self) -> bool:
        """Whether the calling thread holds the step lock (for assertions in tests and invariants)."""
        return self.lock._is_owned()  # type: ignore[attr-defined]  # RLock's own ownership test

