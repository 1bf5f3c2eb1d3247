"""The conversation store under failing disks: read-only, full, unwritable, damaged, killed mid-reply."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from expertswap.app.conversations import ConversationStore
from expertswap.app.reply_turn import ReplyTurn


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Really read-only, also for root (which ignores permission bits): the immutable attribute."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("cannot make a file read-only for root here (no chattr +i)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def _filled(path: Path, conversations: int = 3) -> list[list[dict[str, str]]]:
    store = ConversationStore(path)
    saved = []
    for n in range(conversations):
        c = store.create(f"chat {n}")
        store.add(c, "user", f"question {n}")
        store.add(c, "assistant", f"answer {n} " + "x" * 3000)  # several pages in all
        saved.append(store.messages(c))
    store.close()
    return saved


def test_a_version_1_file_opens_with_its_messages_and_takes_finish_marks(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript("""
            CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL, system TEXT NOT NULL DEFAULT '',
                created REAL NOT NULL, updated REAL NOT NULL);
            CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation INTEGER NOT NULL REFERENCES conversations(id)
                ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
            INSERT INTO conversations VALUES (1, 'Old chat', '', 0, 0);
            INSERT INTO messages VALUES (1, 1, 'user', 'hi', 0), (2, 1, 'assistant', 'hello and', 0);
            PRAGMA user_version = 1;""")
    store = ConversationStore(path)
    assert store.messages(1) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello and"}]
    assert store.finishes(1) == ["", ""]
    store.set_finish(2, "length")
    assert store.finishes(1) == ["", "length"] and "*Cut at the length limit" in store.to_markdown(1)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == 2
    store.close()


def test_search_is_literal(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    for title in ("50% off", "snake_case", "plain", "back\\slash"):
        store.create(title)
    assert [c.title for c in store.search("%")] == ["50% off"]
    assert [c.title for c in store.search("_")] == ["snake_case"]
    assert [c.title for c in store.search("\\")] == ["back\\slash"]
    assert len(store.search("")) == 4


def test_read_only_file_keeps_chatting_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    saved = _filled(path)
    before = path.read_bytes()
    with read_only(path):
        store = ConversationStore(path)
        assert "memory" in store.problem and str(path) in store.problem
        assert [store.messages(c.id) for c in reversed(store.search())] == saved  # the old chats are there
        c = store.create("new")
        assert store.add(c, "user", "hello") is not None
        assert store.add(c, "user", "again") is not None  # every later write works too
        assert [m["content"] for m in store.messages(c)] == ["hello", "again"]
        store.close()
    assert path.read_bytes() == before  # and the file was not touched


def test_unwritable_folder_keeps_chatting_in_memory(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    with read_only(folder):
        store = ConversationStore(folder / "sub" / "c.sqlite3")
        assert "memory" in store.problem
        c = store.create("t")
        store.add(c, "user", "hi")
        assert store.messages(c) == [{"role": "user", "content": "hi"}]


def test_disk_full_mid_session_moves_to_memory_without_losing_the_write(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    told: list[str] = []
    store.on_problem = told.append
    c = store.create("t")
    store.add(c, "user", "small")
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite answers SQLITE_FULL, as for a full disk
    message = store.add(c, "assistant", "y" * 100_000)
    assert message is not None and told and "full" in told[0]
    assert [m["content"][:5] for m in store.messages(c)] == ["small", "yyyyy"]
    store.update(message, "shorter")
    assert store.messages(c)[-1]["content"] == "shorter"


def test_garbage_file_is_moved_aside_and_a_fresh_store_opens(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store = ConversationStore(path)
    aside = list(tmp_path.glob("c.sqlite3.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert not store.problem and "moved aside" in store.notices[0] and str(aside[0]) in store.notices[0]
    c = store.create("fresh")
    store.add(c, "user", "works")
    store.close()
    assert ConversationStore(path).messages(c) == [{"role": "user", "content": "works"}]


def test_damaged_page_is_moved_aside_and_readable_rows_recovered(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    saved = _filled(path, conversations=12)
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    victim = len(data) // page // 2  # a page in the middle of the messages
    data[victim * page : (victim + 1) * page] = os.urandom(page)
    path.write_bytes(bytes(data))
    store = ConversationStore(path)
    assert len(list(tmp_path.glob("c.sqlite3.damaged-*"))) == 1
    notice = store.notices[0]
    assert "recovered" in notice
    recovered = [store.messages(c.id) for c in store.search()]
    found = sum(len(m) for m in recovered)
    assert f"{found} messages" in notice
    assert 0 < found < 24  # some rows were lost with the page, the rest came back intact
    whole = [m for m in recovered if len(m) == 2]
    assert whole and all(m in saved for m in whole)
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_reply_to_a_deleted_conversation_writes_nothing(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    c = store.create("t")
    turn = ReplyTurn(store, c)
    turn.add("partial ")
    store.delete(c)
    turn.add("more")
    turn.finish()  # no IntegrityError: the conversation is gone
    assert store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from expertswap.app.conversations import ConversationStore
    from expertswap.app.reply_turn import ReplyTurn
    import expertswap.app.reply_turn as rt
    rt.FLUSH_S = 0.01
    store = ConversationStore(Path(sys.argv[1]))
    for n in range(1000):
        c = store.create(f"chat {n}", first_message=f"question {n}")
        turn = ReplyTurn(store, c)
        for k in range(40):
            turn.add(f"w{n}.{k} ")
            time.sleep(0.0005)
        turn.finish()
        print(n, flush=True)
""")


@pytest.mark.slow  # a subprocess or a long replay: make test runs it, make test-fast does not
def test_kill_9_mid_reply_loses_at_most_the_reply_in_progress(tmp_path: Path) -> None:
    """A child streams replies through the app's store; killed at random moments, what it reported is intact."""
    rng = random.Random(1234)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for attempt in range(15):
        path = tmp_path / f"c{attempt}.sqlite3"
        child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.4, 1.2))
        os.kill(child.pid, signal.SIGKILL)
        done = [int(line) for line in child.communicate()[0].split()]
        store = ConversationStore(path)
        assert not store.notices and not store.problem
        chats = sorted(store.search(), key=lambda c: c.id)
        assert len(chats) >= len(done)
        full = " ".join(f"w{{n}}.{k}" for k in range(40)) + " "
        for n, chat in enumerate(chats):
            messages = store.messages(chat.id)
            assert messages[0] == {"role": "user", "content": f"question {n}"}
            if n in done:  # reported finished before the kill: all of it is there
                assert messages[1:] == [{"role": "assistant", "content": full.format(n=n)}]
            else:  # the reply in progress: a prefix of it at most
                assert len(messages) <= 2
                assert all(full.format(n=n).startswith(m["content"]) for m in messages[1:])
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        store.close()
