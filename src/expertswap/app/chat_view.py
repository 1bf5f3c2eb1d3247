"""The conversation as Markdown; while a reply streams only its tail is re-rendered, a few times a second.

Laying out a growing reply's Markdown on every token took the GUI thread's time from decoding (the two share
the interpreter): chunks gather, and the tail is rendered at most every ``RENDER_MS`` and as the reply ends.
A line break typed or written stays a line break (Markdown would join the lines), a code block is shaded, with
its language and a Copy link above it, and a tool call is shown as one: the function's name and its arguments.
"""

from __future__ import annotations

import bisect

from PySide6.QtCore import QByteArray, QEvent, QTimer, QUrl
from PySide6.QtGui import (
    QColor,
    QPalette,
    QTextBlock,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
    QTextOption,
)
from PySide6.QtWidgets import QApplication, QTextBrowser

from expertswap.app.conversations import FINISH_NOTES
from expertswap.protocol import calls_shown

RENDER_MS = 80  # a streaming reply's tail is laid out at most this often

# GitHub Markdown with raw HTML shown as text: "<script>" in a prompt is words, not markup that hides them
MARKDOWN = QTextDocument.MarkdownFeature(
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub.value | QTextDocument.MarkdownFeature.MarkdownNoHTML.value)


def with_line_breaks(text: str) -> str:
    """Every single newline outside code fences made a hard break, as chat apps show what was typed."""
    pieces = text.split("```")
    return "```".join(piece.replace("\n", "  \n") if n % 2 == 0 else piece for n, piece in enumerate(pieces))


def _is_code(block: QTextBlock) -> bool:
    return block.blockFormat().hasProperty(QTextFormat.Property.BlockCodeLanguage)


def _shade(block: QTextBlock, colour: QColor) -> None:
    shaded = block.blockFormat()
    shaded.setBackground(colour)
    QTextCursor(block).setBlockFormat(shaded)


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
        self._note = ""  # the last message's FINISH_NOTES line
        self._starts: list[int] = []  # where each message begins in the document
        self._texts: list[str] = []
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_MS)
        self._render_timer.timeout.connect(self._render_tail)
        self._codes: dict[int, str] = {}  # each Copy link's code, by the number in its copy: URL
        self._tail_codes: list[int] = []  # the last message's, replaced as it is rendered again
        self._next_code = 0
        self.anchorClicked.connect(self._clicked)

    def loadResource(self, kind: int, url) -> QByteArray:
        """No remote (or local) resources are ever loaded into the view: every image or sheet is empty.

        (An empty QByteArray, not None: PySide6 mis-counts None returned from this override.)
        """
        return QByteArray()

    def add_message(self, role: str, text: str, finish: str = "") -> None:
        """Start a message (header and text, and its ``FINISH_NOTES`` line if it has one) in its own blocks; a
        streaming reply grows it later."""
        self.end_reply()
        cursor = self.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        if not self.document().isEmpty():
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        self._tail_start = cursor.position()
        self._header = f"**{'You' if role == 'user' else 'Assistant'}**\n\n"
        self._tail = ""
        self._starts.append(self._tail_start)
        self._texts.append(text)
        self._tail = text
        self._note = FINISH_NOTES.get(finish, "")
        self._render_tail()

    def begin_reply(self) -> None:
        self.add_message("assistant", "")

    def append_chunk(self, text: str) -> None:
        """Grow the last message; it is re-rendered (that message only) within ``RENDER_MS``."""
        self._tail += text
        self._texts[-1] = self._tail
        if not self._render_timer.isActive():
            self._render_timer.start()

    def end_reply(self, finish: str = "") -> None:
        """Render what is still waiting of the last message now, marked if it was stopped or cut (``finish``)."""
        note = FINISH_NOTES.get(finish, "")
        if self._render_timer.isActive() or note:
            self._render_timer.stop()
            self._note = note
            self._render_tail()

    def _render_tail(self) -> None:
        cursor = self.textCursor()
        cursor.setPosition(self._tail_start)
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        note = f"\n\n*{self._note}*" if self._note else ""
        cursor.insertMarkdown(self._header + with_line_breaks(calls_shown(self._tail)) + note, MARKDOWN)
        self._dress_code()
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def _dress_code(self) -> None:
        """The last message's code blocks: shaded, each under a line with its language and a Copy link."""
        for number in self._tail_codes:
            self._codes.pop(number, None)
        self._tail_codes = []
        shade = self.palette().color(QPalette.ColorRole.AlternateBase)
        block = self.document().findBlock(self._tail_start)
        while block.isValid():
            if not _is_code(block):
                block = block.next()
                continue
            first, lines = block, []
            while block.isValid() and _is_code(block):
                lines.append(block.text())
                _shade(block, shade)
                block = block.next()
            number, self._next_code = self._next_code, self._next_code + 1
            self._codes[number] = "\n".join(lines)
            self._tail_codes.append(number)
            self._label(first, number)

    def _label(self, code: QTextBlock, number: int) -> None:
        """A plain line above ``code``: its language, and Copy (a copy: link this view handles)."""
        language = code.blockFormat().stringProperty(QTextFormat.Property.BlockCodeLanguage) or "code"
        cursor = QTextCursor(code)
        cursor.insertBlock(code.blockFormat())  # the code moves down a block; this one becomes the label
        cursor.movePosition(QTextCursor.MoveOperation.PreviousBlock)
        cursor.setBlockFormat(QTextBlockFormat())
        cursor.insertText(f"{language}  ", QTextCharFormat())  # the palette's colours, so a theme change holds
        link = QTextCharFormat()
        link.setAnchor(True)
        link.setAnchorHref(f"copy:{number}")
        link.setFontUnderline(True)
        cursor.insertText("Copy", link)

    def changeEvent(self, event: QEvent) -> None:
        """A new palette (light or dark): the code blocks' shade follows it."""
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            shade = self.palette().color(QPalette.ColorRole.AlternateBase)
            block = self.document().begin()
            while block.isValid():
                if _is_code(block):
                    _shade(block, shade)
                block = block.next()

    def _clicked(self, url: QUrl) -> None:
        """Only Copy links do anything: every other link in a message stays inert."""
        if url.scheme() == "copy" and (code := self._codes.get(int(url.path() or -1))) is not None:
            QApplication.clipboard().setText(code)

    def texts(self) -> list[str]:
        """The Markdown source of every message shown, in order."""
        return list(self._texts)

    def clear(self) -> None:
        self._render_timer.stop()
        self._codes.clear()
        self._tail_codes = []
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
