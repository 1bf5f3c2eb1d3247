"""The one door every engine forward goes through.

Lock discipline, in one place: the runtime's step lock (``StepLock``) is held for the whole of a forward
and for anything that changes what a forward sees (a resize, a swap batch, a policy switch, a pinned
committee, a residency snapshot). Budget and policy requests from other threads only record what is
wanted; the next step applies them here, between tokens, under the lock. Background copies (the
swapper) read and stage outside the lock and take it only to install a batch. Besides those, only what
reads the committees consistently takes it: a residency snapshot, a new subscription, the stats of a token.

A greedy decode step on the GPU may be queued ahead (``StepGuard.ahead``): it lets go of the lock with the
step still running, and whoever takes the lock next finishes it first, so every holder sees the
committees as the device has them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import torch

from expertswap.engine.decode.session import Session
from expertswap.engine.moe.step_lock import StepLock
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

    def before_step(self, is_prefill: bool, finish: Callable[[], None] | None = None) -> None:
        """Pending budget changes land (after ``finish``, the step still in flight), and what the forward may load
        is set."""

    def after_step(self, is_prefill: bool) -> None:
        """The forward succeeded."""

    def out_of_memory(self, error: BaseException) -> bool:
        """The forward ran out of memory: free some (a smaller budget) and say whether a retry may succeed."""


class StepGuard:
    """Runs a forward under the step lock and forward mode, between ``hooks``; retries it after an OOM."""

    def __init__(self, lock: StepLock, hooks: StepHooks) -> None:
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

    def ahead(self, queue: Callable[[], Callable[[], int]], session: Session) -> Queued:
        """Queue a single-token decode step (``queue()`` queues it and returns its finishing) and leave it in flight,
        for the next holder of the step lock to finish; the step queued before it is finished here, once this one
        is queued, so that the GPU runs one while the host follows the other. OOM: as ``run``."""
        mark = session.mark()
        while True:
            previous = self.lock.ahead()
            try:
                try:
                    with forward_mode():
                        self.steps += 1
                        self.hooks.before_step(False, previous)
                        queued = Queued(queue())
                        self.lock.leave(queued)
                        self.hooks.after_step(False)
                finally:
                    if previous is not None:
                        previous()
                return queued
            except (torch.OutOfMemoryError, MemoryError) as exc:
                if not session.roll_back(mark) or not self.hooks.out_of_memory(exc):
                    raise OutOfMemoryError(f"out of memory even at the smallest budget: {exc}".splitlines()[0]) from exc
            finally:
                self.lock.release()

    def finish(self) -> None:
        """Finish the step in flight, if one is."""
        with self.lock:
            pass

    def held(self) -> bool:
        """Whether the calling thread holds the step lock (for assertions in tests and invariants)."""
        return self.lock._is_owned()


class Queued:
    """A step queued ahead: its greedy pick, once it is finished (by whoever took the step lock next)."""

    def __init__(self, finish: Callable[[], int]) -> None:
        self._finish: Callable[[], int] | None = finish
        self._token = -1

    def __call__(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            self._token = finish()

    @property
    def token(self) -> int:
        if self._finish is not None:
            raise RuntimeError("a queued step was read before it was finished")
        return self._token

