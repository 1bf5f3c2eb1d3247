"""System prompt and sampling settings for the next reply, starting where a chat reads well (``CHAT_SAMPLING``)."""

from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox, QWidget

from expertswap.protocol import CHAT_SAMPLING, Constraint, SamplingSettings


class ReplySettings(QWidget):
    """Temperature 0 means greedy; the system prompt applies to new conversations."""

    def __init__(self) -> None:
        super().__init__()
        start = CHAT_SAMPLING
        self.system = QLineEdit()
        self.system.setPlaceholderText("System prompt (optional)")
        self.system.setAccessibleName("System prompt")
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=start.temperature)
        self.temperature.setAccessibleName("Temperature")
        self.temperature.setToolTip("0: always the likeliest token (greedy, the same reply each time); "
                                    "higher: more varied replies")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=start.top_p)
        self.top_p.setAccessibleName("Top-p")
        self.top_p.setToolTip("Sample only from the likeliest tokens that make up this share of probability")
        self.repetition = QDoubleSpinBox(minimum=1.0, maximum=2.0, singleStep=0.05, value=start.repetition_penalty)
        self.repetition.setAccessibleName("Repetition penalty")
        self.repetition.setToolTip("Above 1: tokens of the last 64 are made less likely, so a reply does not loop")
        self.max_tokens = QSpinBox(minimum=1, maximum=32768, value=start.max_new_tokens)
        self.max_tokens.setAccessibleName("Maximum new tokens")
        self.max_tokens.setToolTip("A reply stops here at the latest, or sooner where the model's context ends; "
                                   "a reply cut so is marked")
        self.json_mode = QCheckBox("Reply in JSON")
        self.json_mode.setAccessibleName("Reply in JSON")
        self.json_mode.setToolTip("The reply is held to one valid JSON object, token by token (constrained "
                                  "decoding): what a script reading the reply needs")
        self.enter_sends = QCheckBox("Enter sends (Shift+Enter: new line)")
        self.enter_sends.setAccessibleName("Enter sends the message")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("System prompt", self.system)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Repetition penalty", self.repetition)
        form.addRow("Max new tokens", self.max_tokens)
        form.addRow("Output", self.json_mode)
        form.addRow("", self.enter_sends)

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_tokens.value(), temperature=self.temperature.value(),
                                top_p=self.top_p.value(), repetition_penalty=self.repetition.value(),
                                constraint=Constraint("json") if self.json_mode.isChecked() else None)
