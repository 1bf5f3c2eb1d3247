"""Side panel: saved conversations, newest first, searchable; new, export and delete."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .conversations import ConversationStore


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
        self.search.setPlaceholderText("Search conversations")
        self.search.setAccessibleName("Search conversations")
        self.list = QListWidget()
        self.list.setAccessibleName("Conversations")
        buttons = QHBoxLayout()
        for label, handler in (("New", self.new_requested.emit), ("Export…", self._export), ("Delete", self._delete)):
            button = QPushButton(label)
            button.setAccessibleName(f"{label.rstrip('…')} conversation")
            button.clicked.connect(handler)
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.search)
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        self.search.textChanged.connect(self.refresh)
        self.list.itemActivated.connect(lambda item: self.opened.emit(item.data(Qt.ItemDataRole.UserRole)))
        self.list.itemClicked.connect(lambda item: self.opened.emit(item.data(Qt.ItemDataRole.UserRole)))
        self.refresh()

    def refresh(self) -> None:
        self.list.clear()
        for conversation in self.store.search(self.search.text().strip()):
            item = QListWidgetItem(conversation.title)
            item.setData(Qt.ItemDataRole.UserRole, conversation.id)
            self.list.addItem(item)

    def current_id(self) -> int | None:
        item = self.list.currentItem()
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def _export(self) -> None:
        if (conversation := self.current_id()) is not None:
            self.export_requested.emit(conversation)

    def _delete(self) -> None:
        if (conversation := self.current_id()) is not None:
            self.delete_requested.emit(conversation)
