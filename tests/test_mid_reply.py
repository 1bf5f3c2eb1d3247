"""What users do while a reply streams: every action keeps the stored conversation equal to the window."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from expertswap.app.conversations import ConversationStore
from expertswap.app.main_window import MainWindow
from expertswap.server import BackgroundServer

from .conftest import make_window


@pytest.fixture(params=["local", "remote"])
def window(request, qtbot, loop, tiny_model, open_engine, tmp_path: Path):
    """A shown window on the tiny Qwen3-MoE at full budget: loaded in the window, or behind ExpertSwap's server
    (Model > Connect to server…): every mid-reply action must hold for both."""
    win = make_window(qtbot, tmp_path)
    win.show()
    server = None
    if request.param == "local":
        assert loop.run_until_complete(win.load_model(str(tiny_model("qwen3_moe")), budget="100%"))
    else:
        server = BackgroundServer(open_engine(tiny_model("qwen3_moe"), budget="100%"), "tiny", port=0)
        assert loop.run_until_complete(win.connect_server(server.url))
    win.served_by = server  # type: ignore[attr-defined]
    yield win
    win.session.close()
    if server is not None:
        server.stop()


def _tokens(window: MainWindow, chunks: list[str]) -> int:
    """Tokens in the last reply: a local session emits one chunk per token; a server sends text pieces."""
    server = window.served_by  # type: ignore[attr-defined]
    return len(chunks) if server is None else server.engine.stats().tokens_generated


async def _settle(window: MainWindow) -> None:
    chat = window.chat_controller
    while chat.replying or (chat.reply_task is not None and not chat.reply_task.done()):
        await asyncio.sleep(0.01)


def _reply(loop, window: MainWindow, text: str, tokens: int, at: int | None = None,
           action: Callable[[], object] | None = None) -> list[str]:
    """Send ``text``; on the ``at``-th chunk run ``action`` once; return every chunk the session emitted."""
    chunks: list[str] = []

    def on_chunk(chunk: str) -> None:
        chunks.append(chunk)
        if len(chunks) == at and action is not None:
            action()

    window.reply_settings.max_tokens.setValue(tokens)
    window.session.reply_chunk.connect(on_chunk)
    window.prompt.setPlainText(text)
    window.send()
    loop.run_until_complete(_settle(window))
    window.session.reply_chunk.disconnect(on_chunk)
    return chunks


def _assert_stored_equals_shown(window: MainWindow) -> None:
    if window.chat_controller.conversation is None:
        assert window.chat_controller.messages == []
    else:
        assert window.store.messages(window.chat_controller.conversation) == window.chat_controller.messages
    assert window.chat.texts() == [m["content"] for m in window.chat_controller.messages]
    for chat in window.store.search():
        roles = [m["role"] for m in window.store.messages(chat.id)]
        assert roles[:1] == ["user"] and ("assistant", "assistant") not in itertools.pairwise(roles), roles


def _spy_contexts(window: MainWindow, monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, str]]]:
    contexts: list[list[dict[str, str]]] = []
    reply = window.session.reply

    async def spy(messages, settings):
        contexts.append(list(messages))
        return await reply(messages, settings)

    monkeypatch.setattr(window.session, "reply", spy)
    return contexts


def test_new_chat_mid_reply_keeps_the_partial_reply_where_it_belongs(window, loop, monkeypatch) -> None:
    contexts = _spy_contexts(window, monkeypatch)
    chunks = _reply(loop, window, "first question", 80, at=5, action=window.chat_controller.new_chat)
    first = window.store.search()[0].id
    assert 5 <= len(chunks) < 80  # it stopped
    assert window.store.messages(first) == [{"role": "user", "content": "first question"},
                                            {"role": "assistant", "content": "".join(chunks)}]
    assert window.chat_controller.conversation is None and window.chat.texts() == []
    _assert_stored_equals_shown(window)
    _reply(loop, window, "second question", 6)
    assert contexts[-1] == [{"role": "user", "content": "second question"}]  # nothing leaked into the new chat
    window.regenerate()
    loop.run_until_complete(_settle(window))
    assert [m["role"] for m in window.store.messages(window.chat_controller.conversation)] == ["user", "assistant"]
    _assert_stored_equals_shown(window)


def test_send_right_after_new_chat_waits_for_the_stopping_reply(window, loop) -> None:
    def new_chat_and_send() -> None:
        window.chat_controller.new_chat()
        window.prompt.setPlainText("next one")
        window.send()

    _reply(loop, window, "first", 80, at=3, action=new_chat_and_send)
    chats = sorted(window.store.search(), key=lambda c: c.id)
    assert [window.store.messages(c.id)[0]["content"] for c in chats] == ["first", "next one"]
    assert [m["role"] for m in window.store.messages(chats[1].id)] == ["user", "assistant"]
    _assert_stored_equals_shown(window)


def test_deleting_the_conversation_mid_reply_leaves_nothing_behind(window, loop) -> None:
    chat = window.chat_controller
    _reply(loop, window, "doomed", 80, at=5, action=lambda: chat.delete(chat.conversation))
    assert window.store.search() == [] and window.history.list.count() == 0
    assert window.store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert window.chat_controller.conversation is None and window.chat.texts() == []
    _assert_stored_equals_shown(window)


def test_switching_conversation_mid_reply(window, loop) -> None:
    _reply(loop, window, "one", 4)
    one = window.chat_controller.conversation
    window.chat_controller.new_chat()
    chunks = _reply(loop, window, "two", 80, at=5, action=lambda: window.chat_controller.open(one))
    assert window.chat_controller.conversation == one
    _assert_stored_equals_shown(window)
    two = next(c.id for c in window.store.search() if c.id != one)
    window.chat_controller.open(two)
    assert window.chat_controller.messages[-1] == {"role": "assistant", "content": "".join(chunks)}
    assert "Assistant" in window.chat.toPlainText()
    _assert_stored_equals_shown(window)


def test_regenerate_and_edit_mid_reply_are_refused(window, loop) -> None:
    def meddle() -> None:
        window.regenerate()
        window.edit_last()

    chunks = _reply(loop, window, "steady", 30, at=5, action=meddle)
    assert _tokens(window, chunks) == 30 and window.prompt.toPlainText() == ""
    assert [m["role"] for m in window.chat_controller.messages] == ["user", "assistant"]
    _assert_stored_equals_shown(window)


def test_budget_moves_mid_reply_keep_the_reply(window, loop) -> None:
    chunks = _reply(loop, window, "budget", 30, at=5, action=lambda: window.budget.slider.setValue(0))
    assert _tokens(window, chunks) == 30 and window.chat_controller.messages[-1]["content"] == "".join(chunks)
    _assert_stored_equals_shown(window)


def test_closing_the_window_mid_reply_saves_the_partial_reply(window, loop, qapp, tmp_path: Path) -> None:
    qapp.setQuitOnLastWindowClosed(False)  # as main() runs the app: the loop outlives the window
    chunks = _reply(loop, window, "closing", 80, at=5, action=window.close)
    loop.run_until_complete(window.settled())
    assert len(chunks) < 80
    store = ConversationStore(tmp_path / "conversations.sqlite3")
    (chat,) = store.search()
    saved = store.messages(chat.id)
    assert saved[0] == {"role": "user", "content": "closing"}
    assert saved[1]["role"] == "assistant" and saved[1]["content"] == "".join(chunks[:5])


def test_a_failing_reply_is_shown_and_no_empty_reply_is_stored(window, loop, monkeypatch) -> None:
    engine = window.session.engine

    async def broken(messages, settings):
        raise RuntimeError("the device fell over")
        yield  # an async generator, like the real one

    monkeypatch.setattr(engine, "stream_chat", broken)
    _reply(loop, window, "will it work?", 8)
    assert window.notice.isVisibleTo(window) and "RuntimeError: the device fell over" in window.notice.text()
    assert window.chat_controller.messages == [{"role": "user", "content": "will it work?"}]
    _assert_stored_equals_shown(window)
    monkeypatch.undo()
    window.regenerate()  # answers the message left without a reply
    loop.run_until_complete(_settle(window))
    assert [m["role"] for m in window.chat_controller.messages] == ["user", "assistant"]
    assert not window.notice.isVisibleTo(window)
    _assert_stored_equals_shown(window)


def test_a_model_without_a_chat_template_says_so(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for template in folder.glob("chat_template.*"):
        template.unlink()
    window = make_window(qtbot, tmp_path)
    assert loop.run_until_complete(window.load_model(str(folder)))
    _reply(loop, window, "hello", 8)
    assert "ModelFormatError" in window.notice.text() and "chat template" in window.notice.text()
    assert window.chat_controller.messages == [{"role": "user", "content": "hello"}]
    _assert_stored_equals_shown(window)
    window.session.close()


def test_read_only_database_keeps_every_send_working(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    from .test_conversations import read_only

    path = tmp_path / "conversations.sqlite3"
    ConversationStore(path).close()
    with read_only(path):
        window = make_window(qtbot, tmp_path)
        assert "memory" in window.notice.text() and window.notice.isVisibleTo(window)
        assert loop.run_until_complete(window.load_model(str(tiny_model("qwen3_moe")), budget="100%"))
        _reply(loop, window, "first", 4)
        _reply(loop, window, "second", 4)  # not ignored
        assert [m["role"] for m in window.chat_controller.messages] == ["user", "assistant"] * 2
        _assert_stored_equals_shown(window)
        window.close()


def test_a_corrupt_database_is_moved_aside_and_the_window_opens(qtbot, tmp_path: Path) -> None:
    (tmp_path / "conversations.sqlite3").write_bytes(b"\x00garbage" * 500)
    window = make_window(qtbot, tmp_path)
    assert "moved aside" in window.notice.text() and window.notice.isVisibleTo(window)
    assert list(tmp_path.glob("conversations.sqlite3.damaged-*"))
    assert window.history.list.count() == 0


@pytest.mark.parametrize("window", ["local"], indirect=True)  # the engine's own step, on this machine
def test_out_of_memory_mid_reply_shrinks_the_budget_and_says_so(window, loop, qtbot) -> None:
    from .test_oom import _fail_calls

    engine = window.session.engine
    before = engine.budget_bytes
    _fail_calls(engine, {5})
    chunks = _reply(loop, window, "keep going", 12)
    assert len(chunks) == 12 and window.chat_controller.messages[-1]["content"] == "".join(chunks)
    qtbot.waitUntil(lambda: "Out of memory" in window.notice.text(), timeout=3000)
    assert engine.budget_bytes < before
    assert abs(window.budget.requested_bytes() - engine.budget_bytes) <= engine.total_expert_bytes // 1000 + 1
    _assert_stored_equals_shown(window)


WINDOW_CHILD = """
import asyncio, sys
from pathlib import Path
import qasync
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication
app = QApplication([])
loop = qasync.QEventLoop(app)
asyncio.set_event_loop(loop)
from expertswap.app import reply_turn
from expertswap.app.conversations import ConversationStore
from expertswap.app.main_window import MainWindow
reply_turn.FLUSH_S = 0.05  # a partial reply is rewritten every few tokens, so that kills land among the rewrites
folder = Path(sys.argv[1])
window = MainWindow(store=ConversationStore(folder / "conversations.sqlite3"),
                    settings=QSettings(str(folder / "state.ini"), QSettings.Format.IniFormat))

async def drive():
    assert await window.load_model(sys.argv[2], "50%")
    window.reply_settings.max_tokens.setValue(60)
    print("ready", flush=True)
    for n in range(10_000):
        if n % 3 == 0:
            window.chat_controller.new_chat()
        window.prompt.setPlainText(f"question {n}")
        window.send()
        await window.chat_controller.reply_task
        chat = window.chat_controller
        print("done", n, chat.conversation, len(chat.messages[-1]["content"]), flush=True)

loop.run_until_complete(drive())
"""


def _wait_for_replies(child: subprocess.Popen[str], store: Path, count: int, timeout: float = 180.0) -> None:
    """Until the window has stored ``count`` replies, the last one maybe in part (a read-only look, between its
    writes); the timeout is generous, since a loaded machine may take many times as long as an idle one."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        while db.execute("SELECT count(*) FROM messages WHERE role = 'assistant'").fetchone()[0] < count:
            assert child.poll() is None, "the window exited before it was killed"
            assert time.monotonic() < deadline, f"fewer than {count} replies stored after {timeout} s"
            time.sleep(0.01)


def test_kill_9_of_the_real_window_mid_reply(tiny_model, tmp_path: Path) -> None:
    """The app itself (window, engine, store) killed in its 2nd to 4th reply: finished replies intact, nothing torn.

    The kill waits for the reply it interrupts to be in the store (in part, or whole if it was quick), not for
    a stretch of time: on a loaded machine a fixed delay came before any reply had finished.
    """
    rng = random.Random(99)
    script = tmp_path / "child.py"
    script.write_text(WINDOW_CHILD)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    for attempt in range(4):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        child = subprocess.Popen([sys.executable, str(script), str(folder), str(tiny_model("qwen3_moe"))],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        before = rng.randint(1, 3)  # replies finished before the one the kill interrupts
        _wait_for_replies(child, folder / "conversations.sqlite3", before + 1)
        os.kill(child.pid, signal.SIGKILL)
        finished = {int(n): (int(c), int(length)) for _, n, c, length in
                    (line.split() for line in child.communicate()[0].splitlines() if line.startswith("done"))}
        assert len(finished) >= before  # each printed before the next question was sent
        store = ConversationStore(folder / "conversations.sqlite3")
        assert not store.notices and not store.problem
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {c.id: store.messages(c.id) for c in store.search()}
        questions = [m["content"] for ms in stored.values() for m in ms if m["role"] == "user"]
        for n, (conversation, length) in finished.items():
            messages = stored[conversation]
            at = messages.index({"role": "user", "content": f"question {n}"})
            assert messages[at + 1]["role"] == "assistant" and len(messages[at + 1]["content"]) == length
        for messages in stored.values():
            roles = [m["role"] for m in messages]
            assert roles[:1] == ["user"] and ("assistant", "assistant") not in itertools.pairwise(roles)
        asked = max(finished) + 1  # plus the one in progress, if its question was committed
        assert len(questions) in (asked, asked + 1)
        store.close()
