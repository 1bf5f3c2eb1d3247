"""The app as a client of servers (Model > Connect to server…) and as a server (Model > Serve over the OpenAI
API), offscreen, against real servers on loopback."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from PySide6.QtWidgets import QMessageBox

from expertswap.app.connect_dialog import ConnectDialog
from expertswap.app.conversations import FINISH_NOTES
from expertswap.app.main_window import MainWindow
from expertswap.client import RemoteError
from expertswap.server import BackgroundServer

from .conftest import make_window
from .test_app import _run_reply
from .test_client import plain_server


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the app's loop run (as it always does outside tests) until ``condition`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
def server(tiny_model, open_engine) -> Iterator[BackgroundServer]:
    running = BackgroundServer(open_engine(tiny_model("qwen3_moe"), budget="50%"), "tiny", port=0, api_key="sk-k")
    yield running
    running.stop()


@pytest.fixture
def remote_window(qtbot, loop, tmp_path: Path, server: BackgroundServer) -> Iterator[MainWindow]:
    win = make_window(qtbot, tmp_path)
    win.show()
    assert loop.run_until_complete(win.connect_server(server.url, "sk-k"))
    yield win
    win.session.close()


def test_a_remote_expertswap_chats_and_its_panels_follow_it(remote_window: MainWindow, server: BackgroundServer,
                                                           loop, qtbot, tmp_path: Path) -> None:
    win, engine = remote_window, server.engine
    assert "tiny (remote)" in win.statusBar().currentMessage()
    assert win.budget.isEnabled() and win.budget.total == engine.total_expert_bytes
    assert f"committee of {engine.committee_size(engine.budget_bytes)} of 16 experts" in win.budget.label.text()
    assert not win.budget.follow.isEnabled() and not win.serve_action.isEnabled()
    resident = {k: set(v) for k, v in engine.residency().resident.items()}
    loop.run_until_complete(_until(lambda: win.map.resident == resident))  # the first poll brings the residency
    assert [win.log.filter.itemData(i) for i in range(win.log.filter.count())] == [None, *sorted(resident)]

    win.reply_settings.max_tokens.setValue(8)
    chunks, finished, _ = _run_reply(loop, win, "Hello over there")
    # a reply the server cut at its limit is marked so, as a local one is (finish_reason "length")
    assert engine.last_finish in ("stop", "length") and len("".join(chunks)) > 0
    assert finished == [{"stop": "done", "length": "length"}[engine.last_finish]]
    assert (FINISH_NOTES["length"] in win.chat.toPlainText()) == (engine.last_finish == "length")
    rows = sqlite3.connect(tmp_path / "conversations.sqlite3").execute(
        "SELECT role, content FROM messages ORDER BY id").fetchall()
    assert rows == [("user", "Hello over there"), ("assistant", "".join(chunks))]
    qtbot.waitUntil(lambda: (win.session.drain(), win.log.rows.rowCount())[1] > 0, timeout=5000)  # remote swaps

    win.budget.slider.setValue(0)  # the minimum committee, asked of the server off the GUI thread
    loop.run_until_complete(_until(lambda: engine.budget_bytes == engine.minimum_budget_bytes))


def test_stop_cancels_the_remote_reply(remote_window: MainWindow, server: BackgroundServer, loop) -> None:
    remote_window.reply_settings.max_tokens.setValue(2000)
    chunks, finished, _ = _run_reply(loop, remote_window, "Go on and on", stop_after=2)
    assert finished == ["stopped"] and len(chunks) < 200
    assert server.engine.stats().tokens_generated < 2000


def test_a_budget_request_cut_by_leaving_the_server_is_not_reported(remote_window: MainWindow, loop,
                                                                    monkeypatch) -> None:
    """A failed request is news while its server is the app's; once the user left it, it is not."""
    session, problems, calls = remote_window.session, [], []
    session.problem.connect(problems.append)
    remote = session.remote
    assert remote is not None

    def refused(budget: int, release: threading.Event) -> int:
        release.wait(5)
        calls.append(budget)
        raise RemoteError("the connection to the server was closed during the call")

    now = threading.Event()
    monkeypatch.setattr(remote, "set_budget", lambda budget: refused(budget, now))
    now.set()
    session.set_budget(remote.minimum_budget_bytes)
    loop.run_until_complete(_until(lambda: bool(problems)))
    assert problems == ["RemoteError: the connection to the server was closed during the call"]

    later = threading.Event()
    monkeypatch.setattr(remote, "set_budget", lambda budget: refused(budget, later))
    session.set_budget(remote.minimum_budget_bytes)
    session.close()  # the user connected elsewhere or closed the window while the request was out
    later.set()
    loop.run_until_complete(_until(lambda: len(calls) == 2))
    loop.run_until_complete(asyncio.sleep(0.2))  # the failure handler's turn on the GUI thread
    assert len(problems) == 1


def test_a_plain_openai_server_chats_with_the_panels_off_and_saying_why(qtbot, loop, tmp_path: Path) -> None:
    with plain_server() as url:
        win = make_window(qtbot, tmp_path)
        win.show()
        try:
            assert loop.run_until_complete(win.connect_server(url))
            assert not win.budget.isEnabled()
            assert win.budget.label.text().startswith("Budget not available: not an ExpertSwap server")
            assert "not an ExpertSwap server" in win.map.reason
            chunks, finished, _ = _run_reply(loop, win, "Hi")
            assert finished == ["done"] and "".join(chunks) == "Hello there!"
        finally:
            win.session.close()


def test_an_unreachable_server_is_one_line_and_the_old_engine_stays(window: MainWindow, loop, monkeypatch) -> None:
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    engine = window.session.engine
    assert not loop.run_until_complete(window.connect_server("http://127.0.0.1:9/v1"))
    assert len(shown) == 1 and "RemoteError: cannot reach http://127.0.0.1:9/v1/" in shown[0]
    assert window.session.engine is engine


def test_the_connect_dialog_gives_the_url_and_key(qtbot) -> None:
    dialog = ConnectDialog(None, "http://box:8000/v1")
    qtbot.addWidget(dialog)
    dialog.key.setText(" sk-1 ")
    assert dialog.chosen() == ("http://box:8000/v1", "sk-1")


def test_serving_the_loaded_model_answers_openai_clients(window: MainWindow) -> None:
    assert window.serve_action.isEnabled()
    window.serve_action.trigger()
    server = window.session.server
    assert server is not None and window.serve_action.isChecked()
    assert f"serving at {server.url}" in window.statusBar().currentMessage()
    assert server.url in window.notice.text()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.usage.completion_tokens == 4
    window.serve_action.trigger()  # stop
    assert window.session.server is None and not server.thread.is_alive()
    assert "serving at" not in window.statusBar().currentMessage()


def test_connecting_to_the_windows_own_server_is_refused_and_serving_goes_on(window: MainWindow, loop,
                                                                           monkeypatch) -> None:
    """Adopting its own server would close the engine behind it: refused in one line, and nothing changes."""
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    engine = window.session.engine
    window.serve_action.trigger()
    server = window.session.server
    assert server is not None
    for url in (server.url, f"http://localhost:{server.port}"):  # as shown, and spelled another way
        assert not loop.run_until_complete(window.connect_server(url))
    assert len(shown) == 2 and all("\n" not in text for text in shown), shown
    assert shown[0].startswith(f"RemoteError: {server.url} is this window's own server")
    assert window.session.engine is engine and window.session.server is server and window.serve_action.isChecked()
    assert f"serving at {server.url}" in window.statusBar().currentMessage()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=[{"role": "user", "content": "Still there?"}], max_tokens=4)
    assert reply.usage.completion_tokens == 4
    window.reply_settings.max_tokens.setValue(4)
    chunks, finished, _ = _run_reply(loop, window, "And here?")
    assert finished == ["length"] and len(chunks) == 4


def test_the_window_shows_the_servers_policy_not_its_own_last_choice(qtbot, loop, tmp_path: Path,
                                                                      server: BackgroundServer) -> None:
    win = make_window(qtbot, tmp_path)
    win.show()
    win.budget.policy.setCurrentText("skip")  # what this window last chose, for its own engines
    assert loop.run_until_complete(win.connect_server(server.url, "sk-k"))
    assert server.engine.policy == "exact"
    assert win.budget.policy.currentText() == "exact"
    assert " · exact" in win.statusBar().currentMessage() and "skip" not in win.statusBar().currentMessage()
    win.session.close()
