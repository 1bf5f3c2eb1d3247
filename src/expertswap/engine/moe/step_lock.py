"""The step lock: re-entrant, and whoever takes it finds the committees settled.

A pipelined decode step leaves work in flight when it lets go of the lock: the GPU is still running
the step, and the host has yet to follow its log (``Committee.settle``). The step hands that finishing
to the lock (``leave``). The next holder runs it before anything else, so a budget change, the swapper,
a snapshot or a policy switch always sees maps that agree with the device; only the decoder, taking
the lock for its next step with ``ahead``, queues that step first and finishes the previous one after,
which is what keeps the GPU busy while the host follows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

Finish = Callable[[], None]


class StepLock:
    """An RLock with at most one piece of finishing left by its last holder."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._left: Finish | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if not self._lock.acquire(blocking):
            return False
        try:
            self.finish()
        except BaseException:
            self._lock.release()
            raise
        return True

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> StepLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    def ahead(self) -> Finish | None:
        """Take the lock without finishing what was left; the caller runs the returned finishing itself."""
        self._lock.acquire()
        left, self._left = self._left, None
        return left

    def leave(self, finish: Finish) -> None:
        """Hand ``finish`` to the next holder (the caller holds the lock, and nothing else is left)."""
        assert self._is_owned() and self._left is None
        self._left = finish

    def finish(self) -> None:
        """Run what the last holder left, if anything (the caller holds the lock)."""
        left, self._left = self._left, None
        if left is not None:
            left()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined]  # RLock's own ownership test
