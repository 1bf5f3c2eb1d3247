"""Conversations in SQLite, committed message by message so a crash loses at most the reply in progress."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, system TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, id);
"""


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    system: str
    updated: float


class ConversationStore:
    """One SQLite file; every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA)

    def create(self, title: str, system: str = "") -> int:
        now = time.time()
        with self.db:
            cursor = self.db.execute("INSERT INTO conversations (title, system, created, updated) VALUES (?, ?, ?, ?)",
                                     (title, system, now, now))
        return int(cursor.lastrowid)

    def add(self, conversation: int, role: str, content: str) -> None:
        now = time.time()
        with self.db:
            self.db.execute("INSERT INTO messages (conversation, role, content, created) VALUES (?, ?, ?, ?)",
                            (conversation, role, content, now))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation))

    def messages(self, conversation: int) -> list[dict[str, str]]:
        rows = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY id", (conversation,))
        return [{"role": role, "content": content} for role, content in rows]

    def truncate(self, conversation: int, keep: int) -> None:
        """Keep only the first ``keep`` messages (regenerate and edit rewrite the tail)."""
        with self.db:
            self.db.execute(
                "DELETE FROM messages WHERE conversation = ? AND id NOT IN "
                "(SELECT id FROM messages WHERE conversation = ? ORDER BY id LIMIT ?)",
                (conversation, conversation, keep))

    def get(self, conversation: int) -> Conversation:
        row = self.db.execute("SELECT id, title, system, updated FROM conversations WHERE id = ?",
                              (conversation,)).fetchone()
        if row is None:
            raise KeyError(conversation)
        return Conversation(*row)

    def search(self, text: str = "") -> list[Conversation]:
        """Newest first; ``text`` matches titles and message contents."""
        pattern = f"%{text}%"
        rows = self.db.execute(
            "SELECT id, title, system, updated FROM conversations c WHERE ? = '' OR title LIKE ? OR EXISTS "
            "(SELECT 1 FROM messages m WHERE m.conversation = c.id AND m.content LIKE ?) ORDER BY updated DESC",
            (text, pattern, pattern))
        return [Conversation(*row) for row in rows]

    def delete(self, conversation: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))

    def to_markdown(self, conversation: int) -> str:
        meta = self.get(conversation)
        parts = [f"# {meta.title}", ""]
        if meta.system:
            parts += [f"*System:* {meta.system}", ""]
        for message in self.messages(conversation):
            parts += [f"**{'You' if message['role'] == 'user' else 'Assistant'}**", "", message["content"], ""]
        return "\n".join(parts)

    def close(self) -> None:
        self.db.close()
