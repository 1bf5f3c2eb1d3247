"""The memory-budget slider: from the minimum committee to all experts, with policy beside it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from expertswap.protocol import POLICIES, THRESHOLD_POLICIES, MemorySample, format_bytes

STEPS = 1000
POLICY_TIPS = {
    "exact": "Every routed expert is computed as the model has it; a missing one is loaded first. The output is the "
             "model's own at every budget.",
    "substitute": "A missing expert is replaced by the best resident one while decoding (SwapMoE's virtual "
                  "experts): nothing loads mid-reply, the output is approximate.",
    "skip": "Routings weighted below the threshold are dropped (PC-MoE's skippable computation); the rest load "
            "as in exact. Approximate.",
    "cpu": "A missing expert is computed on the CPU from its host copy while the GPU computes the rest. The "
           "same maths, on another device.",
    "lowbit": "A missing expert is computed from a 4-bit copy kept in RAM: nothing loads or is evicted. "
              "Approximate.",
}


class BudgetPanel(QWidget):
    """Emits ``budget_requested(bytes)`` (debounced) and ``policy_changed(name, skip_threshold)``."""

    budget_requested = Signal(int)
    policy_changed = Signal(str, float)

    def __init__(self) -> None:
        super().__init__()
        self.minimum = self.total = self.experts = 0
        self.committee_size: Callable[[int], int] = lambda _budget: 0
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, STEPS)
        self.slider.setAccessibleName("Memory budget")
        self.slider.setToolTip("How much memory the experts may hold: left, the fewest experts a token needs; "
                               "right, every expert. Moves take effect at the next token, also mid-reply.")
        self.label = QLabel("no model")
        self.label.setAccessibleName("Budget in force")
        self.label.setWordWrap(True)
        self.policy = QComboBox()
        self.policy.addItems(POLICIES)  # until a model is loaded; then the engine's own list
        self.policy.setAccessibleName("Miss policy")
        self.threshold = QDoubleSpinBox(minimum=0.0, maximum=0.99, singleStep=0.05, value=0.2, prefix="threshold ")
        self.threshold.setAccessibleName("Skip threshold")
        self.threshold.setToolTip("skip: drop routings whose weight is below this (a token's strongest is always kept)")
        self.threshold.setEnabled(False)
        self.follow = QCheckBox("Follow free memory")
        self.follow.setAccessibleName("Follow free memory")
        self.follow.setToolTip("Grow or shrink the budget by itself as other programs use or free memory, "
                               "keeping a margin of RAM (VRAM on a GPU) free")
        self.fit = QLabel("")
        self.fit.setAccessibleName("Memory in use")
        self.fit.setWordWrap(True)
        self.fit.setToolTip("The whole app's memory, what its experts hold against the budget, and what is free")
        self._debounce = QTimer(self, singleShot=True, interval=150)
        self._debounce.timeout.connect(lambda: self.budget_requested.emit(self.requested_bytes()))
        self.slider.valueChanged.connect(self._moved)
        self.policy.currentTextChanged.connect(self._policy_moved)
        self.threshold.valueChanged.connect(self._policy_moved)
        row = QHBoxLayout()
        row.addWidget(QLabel("Policy"))
        row.addWidget(self.policy)
        row.addWidget(self.threshold)
        row.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Memory budget for experts"))
        layout.addWidget(self.slider)
        layout.addWidget(self.label)
        layout.addWidget(self.fit)
        layout.addLayout(row)
        layout.addWidget(self.follow)
        layout.addStretch(1)  # maximised, the rows stay together at the top
        self.setEnabled(False)

    def configure(self, minimum: int, total: int, current: int, experts: int, committee_size: Callable[[int], int],
                  policies: Sequence[str], chosen: str) -> None:
        """The loaded engine's figures: byte range, expert count, its planner's committee size, its policies and
        the one in force (a server's own, which this window did not choose)."""
        self.minimum, self.total, self.experts, self.committee_size = minimum, total, experts, committee_size
        self.policy.blockSignals(True)
        self.policy.clear()
        self.policy.addItems(list(policies))
        for index, name in enumerate(policies):
            self.policy.setItemData(index, POLICY_TIPS.get(name, ""), Qt.ItemDataRole.ToolTipRole)
        self.policy.setCurrentText(chosen if chosen in policies else policies[0])
        self.policy.blockSignals(False)
        self.slider.blockSignals(True)
        self.slider.setValue(self._to_step(current))
        self.slider.blockSignals(False)
        self.show_budget(current)
        self.setEnabled(True)

    def unavailable(self, reason: str) -> None:
        """An engine whose budget cannot be set from here (a server that is not ExpertSwap's): say why."""
        self.minimum = self.total = self.experts = 0
        self.label.setText(f"Budget not available: {reason}")
        self.setEnabled(False)

    def requested_bytes(self) -> int:
        return self.minimum + (self.total - self.minimum) * self.slider.value() // STEPS

    def follow_engine(self, budget: int) -> None:
        """The engine moved the budget itself (free memory, out of memory): move the slider without asking again."""
        self.slider.blockSignals(True)
        self.slider.setValue(self._to_step(budget))
        self.slider.blockSignals(False)
        self.show_budget(budget)

    def show_budget(self, budget: int) -> None:
        share = budget / self.total if self.total else 0.0
        self.label.setText(f"{format_bytes(budget)} · {share:.0%} of expert bytes · "
                           f"committee of {self.committee_size(budget)} of {self.experts} experts")

    def show_memory(self, sample: MemorySample, cuda: bool) -> None:
        """Whether the model fits: the app's memory, the experts against the budget, what is free (VRAM on a GPU)."""
        free = (f"{format_bytes(sample.cuda_free_bytes)} VRAM free" if cuda
                else f"{format_bytes(sample.available_ram_bytes)} RAM free")
        self.fit.setText(f"App {format_bytes(sample.rss_bytes)} · experts {format_bytes(sample.resident_expert_bytes)}"
                         f" of {format_bytes(sample.budget_bytes)} · {free}")
        if sample.follow_bytes:  # what the checkbox does, in this machine's figures, before it is ticked
            aim = format_bytes(sample.follow_bytes)
            self.follow.setText(f"Follow free memory ({'budget' if self.follow.isChecked() else 'would set'} {aim})")

    def _policy_moved(self) -> None:
        policy = self.policy.currentText()
        takes = policy in THRESHOLD_POLICIES
        self.threshold.setEnabled(takes)
        self.policy_changed.emit(policy, self.threshold.value() if takes else 0.0)

    def _to_step(self, budget: int) -> int:
        span = self.total - self.minimum
        return STEPS if span <= 0 else round((budget - self.minimum) * STEPS / span)

    def _moved(self) -> None:
        self.show_budget(self.requested_bytes())
        self._debounce.start()
