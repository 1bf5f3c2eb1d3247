"""Every background call of the app goes through ``run_op``, so no error is ever lost.

``run_op(parent, fn).success(on_done).failure(on_error).with_progress("Loading…").start()`` runs
``fn`` on a worker thread (asyncio's, which qasync serves from Qt's loop) and then calls exactly one
of the handlers on the GUI thread. Without a failure handler the error is shown in a dialog. The
progress indicator appears only if the call takes longer than ``PROGRESS_DELAY_MS``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QMessageBox, QProgressDialog, QWidget

from expertswap.protocol import ExpertSwapError

T = TypeVar("T")
PROGRESS_DELAY_MS = 600
log = logging.getLogger("expertswap.app")


def describe(exc: BaseException) -> str:
    """One line a user can read; the engine's typed errors carry their own wording."""
    if isinstance(exc, ExpertSwapError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        return "Out of memory: close other programs or choose a smaller budget."
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    log.error("unexpected error", exc_info=exc)  # the traceback goes to the log, the words to the user
    return f"Unexpected {type(exc).__name__}: {exc}".splitlines()[0]


def show_error(parent: QWidget | None, exc: BaseException, title: str = "ExpertSwap") -> None:
    QMessageBox.warning(parent, title, describe(exc))


class Op(Generic[T]):
    """A call to run off the GUI thread, with its success and failure handlers."""

    def __init__(self, parent: QWidget | None, work: Callable[[], T]) -> None:
        self._parent = parent
        self._work = work
        self._success: Callable[[T], object] = lambda _result: None
        self._failure: Callable[[BaseException], object] = lambda exc: show_error(parent, exc)
        self._label: str | None = None

    def success(self, handler: Callable[[T], object]) -> Op[T]:
        self._success = handler
        return self

    def failure(self, handler: Callable[[BaseException], object]) -> Op[T]:
        self._failure = handler
        return self

    def with_progress(self, label: str) -> Op[T]:
        self._label = label
        return self

    def start(self) -> asyncio.Task[bool]:
        """Schedule it; the task's result says whether it succeeded (handlers have run by then)."""
        return asyncio.ensure_future(self.run())

    async def run(self) -> bool:
        progress = self._progress()
        try:
            result = await asyncio.to_thread(self._work)
        except Exception as exc:  # every failure goes to the failure handler, typed or not
            _close(progress)
            self._failure(exc)
            return False
        _close(progress)
        self._success(result)
        return True

    def _progress(self) -> tuple[QTimer, QProgressDialog] | None:
        if self._label is None:
            return None
        dialog = QProgressDialog(self._label, "", 0, 0, self._parent)
        dialog.setCancelButton(None)
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.setMinimumDuration(0)
        dialog.reset()  # QProgressDialog shows itself on construction timers otherwise
        dialog.hide()
        timer = QTimer(singleShot=True, interval=PROGRESS_DELAY_MS)
        timer.timeout.connect(dialog.show)
        timer.start()
        return timer, dialog


def _close(progress: tuple[QTimer, QProgressDialog] | None) -> None:
    if progress is not None:
        timer, dialog = progress
        timer.stop()
        dialog.close()
        dialog.deleteLater()


def run_op(parent: QWidget | None, work: Callable[[], T]) -> Op[T]:
    """The one way the app runs blocking work: see the module docstring."""
    return Op(parent, work)
