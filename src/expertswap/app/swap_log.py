"""Newest-first, bounded log of swap events, filterable by layer.

A model over a ring of the last ``MAX_ROWS`` events, shown by a view that asks only for the rows on screen: at
the minimum budget a thousand swaps a second arrive, and a table item per cell (seven a swap) cost the GUI
thread, and so the decoder, more than everything else the window draws.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtWidgets import QComboBox, QHeaderView, QTableView, QVBoxLayout, QWidget

from expertswap.protocol import format_bytes

MAX_ROWS = 500
COLUMNS = ["time", "layer", "in", "out", "bytes", "ms", "reason"]
REASONS = {
    "miss": "a token was routed to it and it was not resident: loaded before the token went on",
    "grow": "the budget grew: an empty slot was filled with the next most important expert",
    "prefetch": "the swapper brought it in between tokens, in place of a less important one",
    "shrink": "the budget shrank: the least important experts left",
}
Index = QModelIndex | QPersistentModelIndex


class SwapRows(QAbstractTableModel):
    """The newest ``MAX_ROWS`` swaps, newest first, of the layer shown (None: every layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: deque[tuple[str, Any]] = deque(maxlen=MAX_ROWS)  # (time, event), newest first
        self.layer: int | None = None
        self.shown: list[tuple[str, Any]] = []

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008  (Qt's own default)
        return 0 if parent.isValid() else len(self.shown)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        stamp, event = self.shown[index.row()]
        column = COLUMNS[index.column()]
        if role == Qt.ItemDataRole.ToolTipRole and column == "reason":
            return REASONS.get(event.reason, "")
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        return {"time": stamp, "layer": str(event.layer), "in": _expert(event.expert_in),
                "out": _expert(event.expert_out), "bytes": format_bytes(event.bytes), "ms": f"{event.ms:.1f}",
                "reason": event.reason}[column]

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        if role == Qt.ItemDataRole.ToolTipRole and COLUMNS[section] == "reason":
            return "\n".join(f"{name}: {why}" for name, why in REASONS.items())
        return None

    def add(self, events: list) -> None:
        """A frame's swaps (oldest first) on top."""
        stamp = time.strftime("%H:%M:%S")
        self.events.extendleft((stamp, event) for event in events[-MAX_ROWS:])
        self._refilter()

    def show_layer(self, layer: int | None) -> None:
        self.layer = layer
        self._refilter()

    def clear(self) -> None:
        self.events.clear()
        self._refilter()

    def _refilter(self) -> None:
        self.beginResetModel()
        self.shown = [row for row in self.events if self.layer is None or row[1].layer == self.layer]
        self.endResetModel()


class SwapLog(QWidget):
    """Keeps the last ``MAX_ROWS`` events; the layer filter shows one layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[int] = []  # the filter's layers
        self.filter = QComboBox()
        self.filter.addItem("all layers", None)
        self.filter.setAccessibleName("Swap log layer filter")
        self.rows = SwapRows()
        self.table = QTableView()
        self.table.setModel(self.rows)
        self.table.setAccessibleName("Swap log")
        self.table.verticalHeader().setVisible(False)
        # sized to the first rows, then left alone: fitting every column to 500 rows on each frame's rows cost more
        # than the rows themselves
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setWordWrap(False)
        self.filter.currentIndexChanged.connect(lambda _: self.rows.show_layer(self.filter.currentData()))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.filter)
        layout.addWidget(self.table)

    def set_layers(self, layers: list[int]) -> None:
        """A new engine's layers; the old engine's swaps go."""
        self.layers = list(layers)
        self.rows.clear()
        self.filter.blockSignals(True)
        self.filter.clear()
        self.filter.addItem("all layers", None)
        for layer in layers:
            self.filter.addItem(f"layer {layer}", layer)
        self.filter.blockSignals(False)
        self.rows.show_layer(None)

    def add(self, events: list) -> None:
        """A frame's swaps (oldest first) on top, newest first; only the newest ``MAX_ROWS`` are kept."""
        if not events:
            return
        first = not self.rows.events
        self.rows.add(events)
        if first:
            self.table.resizeColumnsToContents()


def _expert(index: int) -> str:
    return "-" if index < 0 else str(index)
