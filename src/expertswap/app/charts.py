"""Memory and speed over time, straight from the engine's memory samples and token stats.

Both charts share one clock and one time axis. Memory shows what the app controls (its own memory, the
experts it holds, the budget; VRAM on a GPU): free memory, tens of times larger, would flatten them, and the
budget panel states it instead. A reply's speed is drawn per reply: idle time between replies is a gap.
"""

from __future__ import annotations

import math
from collections import deque

import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout, QWidget

HISTORY = 1200  # samples kept per series (10 minutes of 0.5 s memory samples)
MIB = 2**20
IDLE_S = 2.0  # token stats further apart than this belong to different replies: the line breaks between them

MEMORY_SERIES = {
    "app memory": ("rss_bytes", "#1f77b4"),
    "resident experts": ("resident_expert_bytes", "#ff7f0e"),
    "budget": ("budget_bytes", "#d62728"),
    "VRAM allocated": ("cuda_allocated_bytes", "#9467bd"),
}
GPU_ONLY = {"VRAM allocated"}


class _Plot(pg.PlotWidget):
    """A plot of named series against seconds on the charts' shared clock; its legend sits below, off the lines."""

    def __init__(self, title: str, unit: str, series: dict[str, str]) -> None:
        super().__init__()
        self.setBackground(None)
        self.setTitle(title)
        self.setLabel("left", unit)
        self.setLabel("bottom", "s")
        self.x: deque[float] = deque(maxlen=HISTORY)
        self.y: dict[str, deque[float]] = {name: deque(maxlen=HISTORY) for name in series}
        self.curves = {name: self.plot(name=name, pen=pg.mkPen(color, width=2), connect="finite")
                       for name, color in series.items()}
        self.legend = pg.LegendItem(colCount=len(series))
        for name, curve in self.curves.items():
            self.legend.addItem(curve, name)
        self.getPlotItem().layout.addItem(self.legend, 4, 1)

    def add(self, t: float, values: dict[str, float]) -> None:
        """A point of each series; drawn now if the chart shows, else when it is shown (a hidden chart's redraws
        cost the decoder the interpreter for nothing)."""
        self.x.append(t)
        for name, value in values.items():
            self.y[name].append(value)
        if self.isVisible():
            self.redraw()

    def show_series(self, name: str, shown: bool) -> None:
        self.curves[name].setVisible(shown)
        if shown:
            self.legend.addItem(self.curves[name], name)
        else:
            self.legend.removeItem(self.curves[name])

    def redraw(self) -> None:
        for name, curve in self.curves.items():
            curve.setData(list(self.x), list(self.y[name]))

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.redraw()


class Charts(QWidget):
    """Memory (MiB) and speed (tokens/s, hit rate %) charts on one clock; VRAM only on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = _Plot("Memory", "MiB", {name: color for name, (_, color) in MEMORY_SERIES.items()})
        self.speed = _Plot("Speed", "tokens/s · hit rate %", {"tokens/s": "#1f77b4", "hit rate %": "#2ca02c"})
        self.speed.setXLink(self.memory)
        self.memory.setAccessibleName("Memory chart")
        self.speed.setAccessibleName("Speed chart")
        self.t0: float | None = None
        self._last_token: float | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.memory)
        layout.addWidget(self.speed)
        self.set_gpu(False)

    def set_gpu(self, gpu: bool) -> None:
        """VRAM series only where there is VRAM."""
        for name in GPU_ONLY:
            self.memory.show_series(name, gpu)

    def _time(self, t: float) -> float:
        self.t0 = t if self.t0 is None else self.t0
        return t - self.t0

    def add_memory(self, sample) -> None:
        self.memory.add(self._time(sample.t),
                        {name: getattr(sample, field) / MIB for name, (field, _) in MEMORY_SERIES.items()})

    def add_token(self, stats) -> None:
        t = self._time(stats.t)
        if self._last_token is not None and t - self._last_token > IDLE_S:  # a new reply: break the lines
            self.speed.add((t + self._last_token) / 2, {"tokens/s": math.nan, "hit rate %": math.nan})
        self._last_token = t
        self.speed.add(t, {"tokens/s": stats.tokens_per_s, "hit rate %": 100.0 * stats.hit_rate})
