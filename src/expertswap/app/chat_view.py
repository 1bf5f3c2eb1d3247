"""The conversation as Markdown; while a reply streams only its tail is re-rendered."""

from __future__ import annotations

import bisect

from PySide6.QtCore import QByteArray
from PySide6.QtGui import (
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextOption,
)
from PySide6.QtWidgets import QApplication, QTextBrowser

# GitHub Markdown with raw HTML shown as text: "<script>" in a prompt is words, not markup that hides them
MARKDOWN = QTextDocument.MarkdownFeature(
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub.value | QTextDocument.MarkdownFeature.MarkdownNoHTML.value)


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
        self._starts: list[int] = []  # where each message begins in the document
        self._texts: list[str] = []

    def loadResource(self, kind: int, url) -> QByteArray:
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
        self._starts.append(self._tail_start)
        self._texts.append("")
        self.append_chunk(text)

    def begin_reply(self) -> None:
        self.add_message("assistant", "")

    def append_chunk(self, text: str) -> None:
        """Grow the last message, re-rendering only that message."""
        self._tail += text
        self._texts[-1] = self._tail
        cursor = self.textCursor()
        cursor.setPosition(self._tail_start)
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        cursor.insertMarkdown(self._header + self._tail, MARKDOWN)
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def texts(self) -> list[str]:
        """The Markdown source of every message shown, in order."""
        return list(self._texts)

    def clear(self) -> None:
        super().clear()
        self._starts.clear()
        self._texts.clear()

    def message_at(self, position: int) -> str | None:
        """The Markdown source of the message shown at a document position."""
        index = bisect.bisect_right(self._starts, position) - 1
        return self._texts[index] if index >= 0 else None

    def contextMenuEvent(self, event) -> None:
        menu = self.createStandardContextMenu(event.pos())
        text = self.message_at(self.cursorForPosition(event.pos()).position())
        if text is not None:
            menu.addSeparator()
            menu.addAction("Copy this message", lambda: QApplication.clipboard().setText(text))
        menu.exec(event.globalPos())
