"""Side panel: saved conversations, newest first, each with when it was last used; searchable; new and delete
(export and delete also on a conversation's context menu)."""

from __future__ import annotations

import time

from PySide6.QtCore import QPoint, Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .conversations import ConversationStore


def when(stamp: float, now: float | None = None) -> str:
    """A conversation's last use as a person says it: "Today 14:05", "Yesterday 09:12", "3 Dec", "3 Dec 2025"."""
    then, today = time.localtime(stamp), time.localtime(now if now is not None else time.time())
    days = (time.mktime((*today[:3], 0, 0, 0, 0, 0, -1)) - time.mktime((*then[:3], 0, 0, 0, 0, 0, -1))) / 86400
    if round(days) == 0:
        return time.strftime("Today %H:%M", then)
    if round(days) == 1:
        return time.strftime("Yesterday %H:%M", then)
    day = f"{then.tm_mday} {time.strftime('%b', then)}"
    return day if then.tm_year == today.tm_year else f"{day} {then.tm_year}"


class HistoryPanel(QWidget):
    """Lists the store's conversations; emits the id the user picks or acts on."""

    opened = Signal(int)
    new_requested = Signal()
    export_requested = Signal(int)
    delete_requested = Signal(int)

    def __init__(self, store: ConversationStore) -> None:
        super().__init__()
        self.store = store
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search conversations (Ctrl+F)")
        self.search.setAccessibleName("Search conversations")
        self.search.setClearButtonEnabled(True)
        for clear in self.search.findChildren(QToolButton):  # the clear button Qt adds
            clear.setAccessibleName("Clear the search")
        self.list = QListWidget()
        self.list.setAccessibleName("Conversations")
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # long titles are elided
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.empty = QLabel()
        self.empty.setAccessibleName("No conversations")
        self.empty.setWordWrap(True)
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        buttons = QHBoxLayout()
        for label, handler in (("New", self.new_requested.emit), ("Delete", self._delete)):
            button = QPushButton(label)
            button.setAccessibleName(f"{label} conversation")
            button.clicked.connect(handler)
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.search)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.empty, 1)
        layout.addLayout(buttons)
        self.search.textChanged.connect(self.refresh)
        self.list.itemActivated.connect(lambda item: self.opened.emit(item.data(Qt.ItemDataRole.UserRole)))
        self.list.itemClicked.connect(lambda item: self.opened.emit(item.data(Qt.ItemDataRole.UserRole)))
        self.refresh()

    def refresh(self) -> None:
        self.list.clear()
        text = self.search.text().strip()
        now = time.time()
        for conversation in self.store.search(text):
            item = QListWidgetItem(f"{conversation.title}\n{when(conversation.updated, now)}")
            item.setData(Qt.ItemDataRole.UserRole, conversation.id)
            item.setToolTip(conversation.title)
            self.list.addItem(item)
        shown = self.list.count() > 0
        self.list.setVisible(shown)
        self.empty.setVisible(not shown)
        self.empty.setText(f"No conversation matches “{text}”." if text else
                           "No conversations yet. Send a message to start one.")

    def current_id(self) -> int | None:
        item = self.list.currentItem()
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def export_current(self) -> None:
        if (conversation := self.current_id()) is not None:
            self.export_requested.emit(conversation)

    def _delete(self) -> None:
        if (conversation := self.current_id()) is not None:
            self.delete_requested.emit(conversation)

    def _menu(self, at: QPoint) -> None:
        item = self.list.itemAt(at)
        if item is None:
            return
        conversation = int(item.data(Qt.ItemDataRole.UserRole))
        menu = QMenu(self)
        menu.addAction("Open", lambda: self.opened.emit(conversation))
        menu.addAction("Export…", lambda: self.export_requested.emit(conversation))
        menu.addAction("Delete", lambda: self.delete_requested.emit(conversation))
        menu.exec(self.list.viewport().mapToGlobal(at))
