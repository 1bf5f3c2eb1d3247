"""run_op: work off the GUI thread, exactly one handler after it, a progress dialog only for slow work."""

from __future__ import annotations

import threading
import time

import pytest
from PySide6.QtWidgets import QMessageBox, QProgressDialog, QWidget

from expertswap.app.ops import describe, run_op
from expertswap.protocol import BudgetError


def test_success_runs_on_the_gui_thread_with_the_result(qtbot, loop) -> None:
    seen: list[tuple[str, object]] = []
    work_thread: list[threading.Thread] = []

    def work() -> int:
        work_thread.append(threading.current_thread())
        return 42

    op = run_op(None, work).success(lambda r: seen.append((threading.current_thread().name, r)))
    op.failure(lambda exc: seen.append(("failure", exc)))
    assert loop.run_until_complete(op.start()) is True
    assert seen == [(threading.main_thread().name, 42)] and work_thread[0] is not threading.main_thread()


@pytest.mark.parametrize(("error", "words"), [
    (BudgetError("budget 'lots' is not a budget"), "BudgetError: budget 'lots' is not a budget"),
    (ValueError("bad\nsecond line"), "Unexpected ValueError: bad"),
    (MemoryError(), "Out of memory"),
    (PermissionError(13, "Permission denied", "/x/chat.md"), "Permission denied: /x/chat.md"),
])
def test_every_failure_reaches_the_user_in_one_line(qtbot, loop, monkeypatch, error, words) -> None:
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))

    def fail() -> None:
        raise error

    assert loop.run_until_complete(run_op(None, fail).start()) is False
    assert shown == [describe(error)] and shown[0].startswith(words)
    assert "\n" not in shown[0]


def test_progress_shows_only_for_slow_work(qtbot, loop) -> None:
    parent = QWidget()
    qtbot.addWidget(parent)

    def dialogs() -> list[QProgressDialog]:
        return [d for d in parent.findChildren(QProgressDialog) if d.isVisible()]

    seen_visible: list[bool] = []

    def slow() -> None:
        time.sleep(1.0)

    async def watch() -> None:
        import asyncio

        task = run_op(parent, slow).with_progress("Working…").start()
        await asyncio.sleep(0.2)
        seen_visible.append(bool(dialogs()))  # not yet: fast work never flashes a dialog
        await asyncio.sleep(0.6)
        seen_visible.append(bool(dialogs()))  # after ~600 ms it is up
        await task
        seen_visible.append(bool(dialogs()))

    loop.run_until_complete(watch())
    assert seen_visible == [False, True, False]
