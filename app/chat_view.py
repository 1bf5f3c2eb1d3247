"""The conversation as Markdown; while a reply streams only its tail is re-rendered."""

from __future__ import annotations

from PySide6.QtCore import QByteArray
from PySide6.QtGui import QTextBlockFormat, QTextCharFormat, QTextCursor, QTextOption
from PySide6.QtWidgets import QTextBrowser


class ChatView(QTextBrowser):
    """Read-only transcript. Never fetches anything: links and images stay inert."""

    def __init__(self) -> None:
        super().__init__()
        self.setOpenLinks(False)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        self.setAccessibleName("Conversation")
        self._tail_start = 0
        self._header = ""
        self._tail = ""

    def loadResource(self, kind: int, url) -> QByteArray:  # noqa: N802 (Qt name)
        """No remote (or local) resources are ever loaded into the view: every image or sheet is empty.

        (An empty QByteArray, not None: PySide6 mis-counts None returned from this override.)
        """
        return QByteArray()

    def add_message(self, role: str, text: str) -> None:
        """Start a message (header and text) in its own blocks; a streaming reply grows it later."""
        cursor = self.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        if not self.document().isEmpty():
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        self._tail_start = cursor.position()
        self._header = f"**{'You' if role == 'user' else 'Assistant'}**\n\n"
        self._tail = ""
        self.append_chunk(text)

    def begin_reply(self) -> None:
        self.add_message("assistant", "")

    def append_chunk(self, text: str) -> None:
        """Grow the last message, re-rendering only that message."""
        self._tail += text
        cursor = self.textCursor()
        cursor.setPosition(self._tail_start)
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        cursor.insertMarkdown(self._header + self._tail)
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    @property
    def reply_text(self) -> str:
        return self._tail
