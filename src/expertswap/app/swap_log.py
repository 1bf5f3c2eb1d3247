"""Newest-first, bounded log of swap events, filterable by layer."""

from __future__ import annotations

import time

from PySide6.QtWidgets import (
    QComboBox,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from expertswap.protocol import format_bytes

MAX_ROWS = 500
COLUMNS = ["time", "layer", "in", "out", "bytes", "ms", "reason"]
REASONS = {
    "miss": "a token was routed to it and it was not resident: loaded before the token went on",
    "grow": "the budget grew: an empty slot was filled with the next most important expert",
    "prefetch": "the swapper brought it in between tokens, in place of a less important one",
    "shrink": "the budget shrank: the least important experts left",
}


class SwapLog(QWidget):
    """Keeps the last ``MAX_ROWS`` events; the layer filter hides the other layers' rows."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[int] = []  # the filter's layers
        self.filter = QComboBox()
        self.filter.addItem("all layers", None)
        self.filter.setAccessibleName("Swap log layer filter")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        header = QTableWidgetItem("reason")
        header.setToolTip("\n".join(f"{name}: {why}" for name, why in REASONS.items()))
        self.table.setHorizontalHeaderItem(COLUMNS.index("reason"), header)
        self.table.setAccessibleName("Swap log")
        self.table.verticalHeader().setVisible(False)
        # sized to the first rows, then left alone: fitting every column to 500 rows on each frame's rows cost more
        # than the rows themselves
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setWordWrap(False)
        self.filter.currentIndexChanged.connect(self._apply_filter)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.filter)
        layout.addWidget(self.table)

    def set_layers(self, layers: list[int]) -> None:
        """A new engine's layers; the old engine's swaps go."""
        self.layers = list(layers)
        self.table.setRowCount(0)
        self.filter.blockSignals(True)
        self.filter.clear()
        self.filter.addItem("all layers", None)
        for layer in layers:
            self.filter.addItem(f"layer {layer}", layer)
        self.filter.blockSignals(False)

    def add(self, events: list) -> None:
        """A frame's swaps (oldest first) on top, newest first, in one repaint; only the newest ``MAX_ROWS``."""
        new = events[-MAX_ROWS:]
        if not new:
            return
        stamp = time.strftime("%H:%M:%S")
        wanted = self.filter.currentData()
        table = self.table
        first = table.rowCount() == 0
        table.setUpdatesEnabled(False)
        try:
            table.model().insertRows(0, len(new))
            for row, event in enumerate(reversed(new)):
                values = [stamp, str(event.layer), _expert(event.expert_in), _expert(event.expert_out),
                          format_bytes(event.bytes), f"{event.ms:.1f}"]
                for column, value in enumerate(values):
                    table.setItem(row, column, QTableWidgetItem(value))
                reason = QTableWidgetItem(event.reason)
                reason.setToolTip(REASONS.get(event.reason, ""))
                table.setItem(row, len(values), reason)
                table.setRowHidden(row, wanted is not None and event.layer != wanted)
            if table.rowCount() > MAX_ROWS:
                table.model().removeRows(MAX_ROWS, table.rowCount() - MAX_ROWS)
            if first:
                table.resizeColumnsToContents()
        finally:
            table.setUpdatesEnabled(True)

    def _apply_filter(self) -> None:
        wanted = self.filter.currentData()
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 1)
            self.table.setRowHidden(row, wanted is not None and item is not None and item.text() != str(wanted))


def _expert(index: int) -> str:
    return "-" if index < 0 else str(index)
