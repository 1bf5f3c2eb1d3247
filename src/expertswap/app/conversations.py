"""Conversations in SQLite, committed as they grow, so a crash loses at most the reply in progress.

The store never makes the app unusable: a damaged file is moved aside and what SQLite can still
read is copied into a fresh one; a read-only, full or unwritable location switches the store to
an in-memory copy, and ``problem`` says so in words for the window to show.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 2  # 2: messages.finish
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, system TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL, finish TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, id);
"""
# how a reply that did not end by itself is marked, on screen and in an export ('' for every other message)
FINISH_NOTES = {"stopped": "Stopped before its end.",
                "length": "Cut at the length limit: raise Max new tokens for a longer reply."}
_SALVAGE_GAPS = (1, 2, 8, 64, 512, 4096, 32768, 262144)  # how far past a damaged row to look for more


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    system: str
    updated: float


@dataclass(frozen=True)
class Removed:
    """A deleted conversation's rows, as ``restore`` puts them back (Undo)."""

    conversation: tuple
    messages: list[tuple]


class ConversationStore:
    """One SQLite file; every write is its own transaction and never raises for a failing disk."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.problem = ""  # why chats are not being saved to disk, or "" when they are
        self.notices: list[str] = []  # one-off news for the user: a file moved aside, rows recovered
        self.on_problem: Callable[[str], None] | None = None
        self.db = self._open()

    # ---- opening ---------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            return self._memory()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._connect(self.path)
        except sqlite3.DatabaseError as exc:
            if _is_corrupt(exc):
                return self._replace_damaged()
            return self._fall_back(f"{self.path} cannot be written ({exc})")
        except OSError as exc:
            return self._fall_back(f"{self.path.parent} cannot be written ({exc.strerror or exc})")

    @staticmethod
    def _connect(path: Path | str) -> sqlite3.Connection:
        """Open, check and claim the file: the version stamp is a real write, so a read-only file fails here."""
        db = sqlite3.connect(path)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
            db.executescript(SCHEMA)
            if "finish" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}:  # a version 1 file
                with db:
                    db.execute("ALTER TABLE messages ADD COLUMN finish TEXT NOT NULL DEFAULT ''")
            with db:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _memory(self, source: sqlite3.Connection | None = None) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:")
        if source is not None:
            with contextlib.suppress(sqlite3.Error):  # nothing readable to carry over
                source.backup(db)
        db.execute("PRAGMA foreign_keys = ON")
        db.executescript(SCHEMA)
        return db

    def _fall_back(self, why: str, current: sqlite3.Connection | None = None) -> sqlite3.Connection:
        """Keep chatting in memory, starting from what the file holds, and say so."""
        if current is None and self.path is not None and self.path.is_file():
            try:
                current = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            except sqlite3.Error:
                current = None
        db = self._memory(current)
        if current is not None:
            current.close()
        self.problem = f"Chats are kept in memory only and will be lost on exit: {why}."
        if self.on_problem is not None:
            self.on_problem(self.problem)
        return db

    def _replace_damaged(self) -> sqlite3.Connection:
        """Move the damaged file aside, start a fresh one and copy into it whatever rows can still be read."""
        assert self.path is not None
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            self.path.rename(aside)
            db = self._connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            return self._fall_back(f"{self.path} is damaged and could not be moved aside ({exc})")
        conversations, messages = _salvage(aside, db)
        self.notices.append(f"The conversations file was damaged. It was moved aside to {aside}; "
                            f"{conversations} conversations and {messages} messages could be recovered.")
        return db

    # ---- writes ----------------------------------------------------------------------------------
    def _write(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """One transaction; if the disk refuses it, move to memory and apply it there, losing nothing."""
        try:
            with self.db:
                return change(self.db)
        except sqlite3.DatabaseError as exc:
            if self.problem or isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise  # already in memory, or a bug: not a disk problem
            self.db = self._fall_back(f"saving failed ({exc})", current=self.db)
            with self.db:
                return change(self.db)

    def create(self, title: str, system: str = "", first_message: str | None = None) -> int:
        """A new conversation, with its first user message in the same transaction (no empty chats)."""
        now = time.time()

        def change(db: sqlite3.Connection) -> int:
            cursor = db.execute("INSERT INTO conversations (title, system, created, updated) VALUES (?, ?, ?, ?)",
                                (title, system, now, now))
            if first_message is not None:
                db.execute("INSERT INTO messages (conversation, role, content, created) VALUES (?, 'user', ?, ?)",
                           (cursor.lastrowid, first_message, now))
            assert cursor.lastrowid is not None  # an INSERT that succeeded has a row id
            return cursor.lastrowid

        return self._write(change)

    def add(self, conversation: int, role: str, content: str) -> int | None:
        """Append a message; returns its id, or None when the conversation no longer exists (deleted)."""
        now = time.time()

        def change(db: sqlite3.Connection) -> int | None:
            cursor = db.execute(
                "INSERT INTO messages (conversation, role, content, created) "
                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM conversations WHERE id = ?)",
                (conversation, role, content, now, conversation))
            if cursor.rowcount != 1:
                return None
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation))
            return cursor.lastrowid

        return self._write(change)

    def update(self, message: int, content: str) -> None:
        """Rewrite a message's text (a reply that grows while it streams)."""
        self._write(lambda db: db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message)))

    def set_finish(self, message: int, finish: str) -> None:
        """How a reply ended, when it did not end by itself (a key of ``FINISH_NOTES``)."""
        self._write(lambda db: db.execute("UPDATE messages SET finish = ? WHERE id = ?", (finish, message)))

    def truncate(self, conversation: int, keep: int) -> None:
        """Keep only the first ``keep`` messages (regenerate and edit rewrite the tail)."""
        self._write(lambda db: db.execute(
            "DELETE FROM messages WHERE conversation = ? AND id NOT IN "
            "(SELECT id FROM messages WHERE conversation = ? ORDER BY id LIMIT ?)",
            (conversation, conversation, keep)))

    def delete(self, conversation: int) -> Removed | None:
        """Delete a conversation; returns its rows for ``restore`` (None: there was none)."""
        row = self.db.execute("SELECT id, title, system, created, updated FROM conversations WHERE id = ?",
                              (conversation,)).fetchone()
        messages = self.db.execute("SELECT id, conversation, role, content, created, finish FROM messages "
                                   "WHERE conversation = ? ORDER BY id", (conversation,)).fetchall()
        self._write(lambda db: db.execute("DELETE FROM conversations WHERE id = ?", (conversation,)))
        return Removed(row, messages) if row is not None else None

    def restore(self, removed: Removed) -> None:
        """Put a deleted conversation back as it was, under its own id."""
        def change(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO conversations (id, title, system, created, updated) VALUES (?, ?, ?, ?, ?)",
                       removed.conversation)
            db.executemany("INSERT INTO messages (id, conversation, role, content, created, finish) "
                           "VALUES (?, ?, ?, ?, ?, ?)", removed.messages)

        self._write(change)

    # ---- reads -----------------------------------------------------------------------------------
    def messages(self, conversation: int) -> list[dict[str, str]]:
        rows = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY id", (conversation,))
        return [{"role": role, "content": content} for role, content in rows]

    def finishes(self, conversation: int) -> list[str]:
        """Beside ``messages``: how each ended ('' unless a reply was stopped or cut)."""
        rows = self.db.execute("SELECT finish FROM messages WHERE conversation = ? ORDER BY id", (conversation,))
        return [finish for (finish,) in rows]

    def exists(self, conversation: int) -> bool:
        return self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation,)).fetchone() is not None

    def get(self, conversation: int) -> Conversation:
        row = self.db.execute("SELECT id, title, system, updated FROM conversations WHERE id = ?",
                              (conversation,)).fetchone()
        if row is None:
            raise KeyError(conversation)
        return Conversation(*row)

    def search(self, text: str = "") -> list[Conversation]:
        """Newest first; ``text`` matches titles and message contents literally (% and _ are not wildcards)."""
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        rows = self.db.execute(
            "SELECT id, title, system, updated FROM conversations c WHERE ? = '' OR title LIKE ? ESCAPE '\\' "
            "OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation = c.id AND m.content LIKE ? ESCAPE '\\') "
            "ORDER BY updated DESC",
            (text, pattern, pattern))
        return [Conversation(*row) for row in rows]

    def to_markdown(self, conversation: int) -> str:
        meta = self.get(conversation)
        parts = [f"# {meta.title}", ""]
        if meta.system:
            parts += [f"*System:* {meta.system}", ""]
        for message, finish in zip(self.messages(conversation), self.finishes(conversation), strict=True):
            parts += [f"**{'You' if message['role'] == 'user' else 'Assistant'}**", "", message["content"], ""]
            if finish in FINISH_NOTES:
                parts += [f"*{FINISH_NOTES[finish]}*", ""]
        return "\n".join(parts)

    def close(self) -> None:
        self.db.close()


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


def _salvage(damaged: Path, into: sqlite3.Connection) -> tuple[int, int]:
    """Copy every readable row of a damaged store into ``into``; returns (conversations, messages) recovered."""
    try:
        source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, 0
    try:
        conversations = _readable_rows(source, "SELECT id, title, system, created, updated FROM conversations")
        messages = _readable_rows(source, "SELECT id, conversation, role, content, created FROM messages")
    finally:
        source.close()
    known = {row[0] for row in conversations}
    now = time.time()
    with into:
        into.executemany("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)", conversations)
        for orphan in sorted({row[1] for row in messages} - known):  # its conversation row was lost
            into.execute("INSERT INTO conversations VALUES (?, ?, '', ?, ?)",
                         (orphan, f"Recovered conversation {orphan}", now, now))
        into.executemany("INSERT INTO messages (id, conversation, role, content, created) VALUES (?, ?, ?, ?, ?)",
                         messages)
    return len(conversations), len(messages)


def _readable_rows(source: sqlite3.Connection, select: str) -> list[tuple]:
    """Rows in rowid order, stepping over damaged pages by probing further ahead."""
    rows: list[tuple] = []
    after = -1
    while True:
        try:
            for row in source.execute(f"{select} WHERE rowid > ? ORDER BY rowid", (after,)):
                rows.append(row)
                after = row[0]
            return rows
        except sqlite3.DatabaseError:
            for gap in _SALVAGE_GAPS:
                try:
                    row = source.execute(f"{select} WHERE rowid > ? ORDER BY rowid LIMIT 1", (after + gap,)).fetchone()
                except sqlite3.DatabaseError:
                    continue
                if row is not None:
                    after = row[0] - 1
                    break
            else:
                return rows
