"""Layers x experts grid: resident experts, their importance, and swaps flashing as they happen."""

from __future__ import annotations

import math
import time

import numpy as np
from PySide6.QtCore import QEvent, QPointF, QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QLabel, QToolTip, QWidget

FLASH_RGB = (255, 170, 0)  # orange, in either theme
FLASH_S = 0.5  # an expert swapped in shows orange this long (only the one coming in: at the minimum budget
# every token swaps, and flashing both ends turned the map into a wall of orange)
FRAME_MS = 100  # the map repaints at most 10 times a second, whatever comes (a snapshot, swaps, a fading flash):
# a repaint per paint, then one per telemetry frame on top of the flashes' own, took the decoder's interpreter
LEFT, TOP = 34, 16  # the margins that hold the layer numbers and the expert numbers


class ExpertMap(QWidget):
    """Paints one cell per (layer, expert); hover for importance. Cells shrink to fit 128 experts."""

    def __init__(self) -> None:
        super().__init__()
        self.setAccessibleName("Expert map")
        self.setMouseTracking(True)
        self.setMinimumSize(QSize(200, 120))
        self.layers: list[int] = []
        self._rows: dict[int, int] = {}  # layer -> its row
        self._pixels = np.empty((0, 0, 4), dtype=np.uint8)
        self.num_experts = 0
        self.resident: dict[int, set[int]] = {}
        self.importance: dict[int, list[float]] = {}
        self.routed: dict[int, list[int]] = {}
        self.last_token: dict[int, set[int]] = {}
        self.flashes: dict[tuple[int, int], float] = {}
        self.reason = ""  # why there is nothing to show, painted in place of the grid
        self._dirty = False  # changed since the last frame
        self._frames = QTimer(self)
        self._frames.setInterval(FRAME_MS)
        self._frames.timeout.connect(self._frame)

    def unavailable(self, reason: str) -> None:
        """No residency to show for this engine: an empty map that says why."""
        self.layers, self.num_experts, self.reason, self._rows = [], 0, reason, {}
        self.resident, self.importance, self.routed, self.last_token = {}, {}, {}, {}
        self.update()

    def show_residency(self, snapshot) -> None:
        self.reason = ""
        self.layers = sorted(snapshot.resident)
        self._rows = {layer: row for row, layer in enumerate(self.layers)}
        self.resident = {layer: set(experts) for layer, experts in snapshot.resident.items()}
        self.importance = dict(snapshot.importance)
        self.routed = dict(snapshot.routed)
        self.last_token = {layer: set(experts) for layer, experts in snapshot.last_token.items()}
        self.num_experts = max((len(v) for v in snapshot.importance.values()), default=0)
        self._changed()

    def flash_swaps(self, events: list) -> None:
        """A frame's swaps, oldest first: their cells flash, and the residents follow them."""
        now = time.monotonic()
        for event in events:
            if event.expert_in >= 0:
                self.flashes[(event.layer, event.expert_in)] = now
            if event.expert_out >= 0:
                self.flashes.pop((event.layer, event.expert_out), None)
                self.resident.setdefault(event.layer, set()).discard(event.expert_out)
            if event.expert_in >= 0:
                self.resident.setdefault(event.layer, set()).add(event.expert_in)
        self._changed()

    def _changed(self) -> None:
        """Paint now if no frame is due, else at the next frame: at most one paint a ``FRAME_MS``."""
        if not self._frames.isActive():
            self.update()
            self._frames.start()
        else:
            self._dirty = True

    def _frame(self) -> None:
        """One frame: what changed since the last, and the flashes fading; the timer stops once both are done."""
        now = time.monotonic()
        self.flashes = {cell: t for cell, t in self.flashes.items() if now - t < FLASH_S}
        if self._dirty or self.flashes:
            self.update()
        else:
            self._frames.stop()
        self._dirty = False

    def _grid(self) -> QRectF:
        """Where the cells go: the widget less the margins of numbers."""
        return QRectF(LEFT, TOP, max(self.width() - LEFT, 1), max(self.height() - TOP, 1))

    def _cell(self) -> tuple[float, float]:
        rows, cols = max(len(self.layers), 1), max(self.num_experts, 1)
        grid = self._grid()
        return grid.width() / cols, grid.height() / rows

    def cell_rect(self, layer: int, expert: int) -> QRectF:
        w, h = self._cell()
        return QRectF(LEFT + expert * w, TOP + self._rows[layer] * h, w, h)

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        if not self.layers:
            return None
        w, h = self._cell()
        row, col = int((y - TOP) // h), int((x - LEFT) // w)
        if y >= TOP and x >= LEFT and 0 <= row < len(self.layers) and 0 <= col < self.num_experts:
            return self.layers[row], col
        return None

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        palette = self.palette()
        painter.fillRect(self.rect(), palette.base())
        if self.reason:
            painter.setPen(palette.text().color())
            painter.drawText(self.rect().adjusted(8, 8, -8, -8),
                             int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap),
                             f"Expert map not available: {self.reason}")
        if self.layers and self.num_experts:
            grid = self._grid()
            painter.drawImage(grid, self._cells(palette))  # one cell a pixel, scaled up
            w, h = self._cell()
            painter.setPen(palette.base().color())  # the gaps between cells, where they are wide enough to show
            if w >= 4:
                for expert in range(1, self.num_experts):
                    painter.drawLine(QPointF(LEFT + expert * w, TOP), QPointF(LEFT + expert * w, self.height()))
            if h >= 4:
                for row in range(1, len(self.layers)):
                    painter.drawLine(QPointF(LEFT, TOP + row * h), QPointF(self.width(), TOP + row * h))
            painter.setPen(palette.text().color())
            for layer in self.layers:
                for expert in self.last_token.get(layer, ()):
                    if expert < self.num_experts:
                        cell = self.cell_rect(layer, expert)
                        painter.drawRect(cell.adjusted(1, 1, -2, -2))
            self._numbers(painter, w, h)
        painter.end()

    def _numbers(self, painter: QPainter, w: float, h: float) -> None:
        """Layer numbers down the left, expert numbers across the top, as many as fit without crowding."""
        font = painter.font()
        font.setPointSizeF(max(font.pointSizeF() * 0.8, 6.0))
        painter.setFont(font)
        painter.setPen(self.palette().placeholderText().color())
        right = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        every = max(1, math.ceil(12 / h))  # a label at least 12 px from the next
        for row in range(0, len(self.layers), every):
            painter.drawText(QRectF(0, TOP + row * h, LEFT - 4, h), right, f"L{self.layers[row]}")
        every = _round_step(math.ceil(22 / w))
        centre = int(Qt.AlignmentFlag.AlignCenter)
        for expert in range(0, self.num_experts, every):
            painter.drawText(QRectF(LEFT + expert * w - 10, 0, w + 20, TOP), centre, str(expert))

    def _cells(self, palette) -> QImage:
        """Every cell's colour as one pixel of an image (a cell a ``fillRect`` cost 7 ms a frame at 8 x 32).

        Resident experts in the accent colour, stronger with their importance; the others in the alternate base
        colour; cells of a recent swap in orange.
        """
        rows, cols = len(self.layers), self.num_experts
        base = np.array(palette.base().color().getRgb()[:3], dtype=np.float32)
        accent = np.array(palette.highlight().color().getRgb()[:3], dtype=np.float32)
        rgb = np.empty((rows, cols, 3), dtype=np.float32)
        rgb[:] = np.array(palette.alternateBase().color().getRgb()[:3], dtype=np.float32)
        for row, layer in enumerate(self.layers):
            scores = np.zeros(cols, dtype=np.float32)
            known = self.importance.get(layer, [])[:cols]
            scores[: len(known)] = known
            top = float(scores.max(initial=0.0)) or 1.0
            resident = [e for e in self.resident.get(layer, ()) if e < cols]
            alpha = 0.35 + 0.65 * scores[resident, None] / top
            rgb[row, resident] = accent * alpha + base * (1 - alpha)
        now = time.monotonic()
        for (layer, expert), at in self.flashes.items():
            if now - at < FLASH_S and expert < cols and layer in self._rows:
                rgb[self._rows[layer], expert] = FLASH_RGB
        pixels = np.empty((rows, cols, 4), dtype=np.uint8)
        pixels[..., :3] = rgb.round().clip(0, 255)
        pixels[..., 3] = 255
        self._pixels = pixels  # the image reads this buffer while it is painted
        return QImage(pixels.data, cols, rows, cols * 4, QImage.Format.Format_RGBA8888)

    def cell_text(self, layer: int, expert: int) -> str:
        """The tooltip of one cell, from the latest snapshot."""
        scores, routed = self.importance.get(layer, []), self.routed.get(layer, [])
        state = "resident" if expert in self.resident.get(layer, ()) else "not resident"
        last = ", used by the latest token" if expert in self.last_token.get(layer, ()) else ""
        return (f"layer {layer}, expert {expert}: {state}{last}; routed {routed[expert] if expert < len(routed) else 0}"
                f" times, importance {scores[expert] if expert < len(scores) else 0.0:.3g}")

    def mouseMoveEvent(self, event) -> None:
        cell = self.cell_at(event.position().x(), event.position().y())
        if cell is not None:
            QToolTip.showText(event.globalPosition().toPoint(), self.cell_text(*cell), self)


class MapLegend(QLabel):
    """The map's key, in the map's colours: the resident swatch follows the palette (light or dark)."""

    def __init__(self) -> None:
        super().__init__()
        self.setAccessibleName("Expert map legend")
        self.setToolTip("A row per MoE layer, a cell per expert; hover a cell for its counts")
        self.setWordWrap(True)
        self._write()

    def _write(self) -> None:
        accent, flash = self.palette().highlight().color().name(), QColor(*FLASH_RGB).name()
        self.setText(f"<span style='color:{accent}'>■</span> resident (stronger: more important) &nbsp; "
                     f"<span style='color:{flash}'>■</span> just swapped in &nbsp; □ the latest token's "
                     "&nbsp; rows: layers, columns: experts")

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._write()


def _round_step(step: int) -> int:
    """1, 2, 4, 8, 16, ...: expert numbers at round intervals."""
    return 1 << max(step - 1, 0).bit_length()
