"""Memory and speed over time, straight from the engine's memory samples and token stats."""

from __future__ import annotations

from collections import deque

import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout, QWidget

HISTORY = 1200  # samples kept per series (10 minutes of 0.5 s memory samples)
MIB = 2**20

MEMORY_SERIES = {
    "process RSS": ("rss_bytes", "#1f77b4"),
    "available RAM": ("available_ram_bytes", "#2ca02c"),
    "VRAM allocated": ("cuda_allocated_bytes", "#9467bd"),
    "VRAM free": ("cuda_free_bytes", "#8c564b"),
    "resident experts": ("resident_expert_bytes", "#ff7f0e"),
    "budget": ("budget_bytes", "#d62728"),
}


class _Plot(pg.PlotWidget):
    """A plot of named series against seconds since the first point."""

    def __init__(self, title: str, unit: str, series: dict[str, str]) -> None:
        super().__init__()
        self.setBackground(None)
        self.setTitle(title)
        self.setLabel("left", unit)
        self.setLabel("bottom", "s")
        self.addLegend(offset=(5, 5))
        self.t0: float | None = None
        self.x: deque[float] = deque(maxlen=HISTORY)
        self.y: dict[str, deque[float]] = {name: deque(maxlen=HISTORY) for name in series}
        self.curves = {name: self.plot(name=name, pen=pg.mkPen(color, width=2)) for name, color in series.items()}

    def add(self, t: float, values: dict[str, float]) -> None:
        """A point of each series; drawn now if the chart shows, else when it is shown (a hidden chart's redraws
        cost the decoder the interpreter for nothing)."""
        self.t0 = t if self.t0 is None else self.t0
        self.x.append(t - self.t0)
        for name, value in values.items():
            self.y[name].append(value)
        if self.isVisible():
            self.redraw()

    def redraw(self) -> None:
        for name, curve in self.curves.items():
            curve.setData(list(self.x), list(self.y[name]))

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.redraw()


class Charts(QWidget):
    """Memory (MiB) and speed (tokens/s, hit rate %) charts; VRAM series stay flat at 0 on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = _Plot("Memory", "MiB", {name: color for name, (_, color) in MEMORY_SERIES.items()})
        self.speed = _Plot("Speed", "tokens/s · hit rate %", {"tokens/s": "#1f77b4", "hit rate %": "#2ca02c"})
        self.memory.setAccessibleName("Memory chart")
        self.speed.setAccessibleName("Speed chart")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.memory)
        layout.addWidget(self.speed)

    def add_memory(self, sample) -> None:
        self.memory.add(sample.t, {name: getattr(sample, field) / MIB for name, (field, _) in MEMORY_SERIES.items()})

    def add_token(self, stats) -> None:
        self.speed.add(stats.t, {"tokens/s": stats.tokens_per_s, "hit rate %": 100.0 * stats.hit_rate})
