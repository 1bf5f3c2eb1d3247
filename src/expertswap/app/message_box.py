"""The box a message is typed in: Ctrl+Enter sends, and so does Enter alone when the user asks for it."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QPlainTextEdit

_HINTS = {False: "Message (Ctrl+Enter to send, Esc to stop)",
          True: "Message (Enter to send, Shift+Enter for a new line, Esc to stop)"}


class MessageBox(QPlainTextEdit):
    """``submitted`` on Enter (without Shift) while ``enter_sends``; otherwise Enter is a line break."""

    submitted = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setAccessibleName("Message")
        self.enter_sends = False
        self.set_enter_sends(False)

    def set_enter_sends(self, on: bool) -> None:
        self.enter_sends = on
        self.setPlaceholderText(_HINTS[on])

    def keyPressEvent(self, event: QKeyEvent) -> None:
        enter = event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        plain = not event.modifiers() & (Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.ControlModifier)
        if enter and plain and self.enter_sends:
            self.submitted.emit()
            return
        super().keyPressEvent(event)
