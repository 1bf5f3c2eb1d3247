"""System prompt and sampling settings for the next reply."""

from __future__ import annotations

from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox, QWidget

from expertswap.protocol import SamplingSettings


class ReplySettings(QWidget):
    """Temperature 0 means greedy; the system prompt applies to new conversations."""

    def __init__(self) -> None:
        super().__init__()
        self.system = QLineEdit()
        self.system.setPlaceholderText("System prompt (optional)")
        self.system.setAccessibleName("System prompt")
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.0)
        self.temperature.setAccessibleName("Temperature")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=1.0)
        self.top_p.setAccessibleName("Top-p")
        self.max_tokens = QSpinBox(minimum=1, maximum=8192, value=256)
        self.max_tokens.setAccessibleName("Maximum new tokens")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("System prompt", self.system)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max new tokens", self.max_tokens)

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_tokens.value(), temperature=self.temperature.value(),
                                top_p=self.top_p.value())
