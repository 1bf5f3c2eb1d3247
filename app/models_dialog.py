"""Pick a model: a local folder or one in the Hugging Face cache, with a fit report before loading."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QListWidget,
    QListWidgetItem, QPushButton, QSpinBox, QVBoxLayout,
)

from expertswap.engine import ExpertSwapError, format_bytes
from expertswap.engine.fit import fit_report
from expertswap.engine.hub import cached_models


class ModelsDialog(QDialog):
    """``chosen()`` gives (folder, budget) once accepted; Load stays disabled until a report exists."""

    def __init__(self, parent=None, cache: Path | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Open a model")
        self.folder = QLineEdit()
        self.folder.setAccessibleName("Model folder")
        browse = QPushButton("Browse…")
        browse.setAccessibleName("Browse for a model folder")
        browse.clicked.connect(self._browse)
        self.cached = QListWidget()
        self.cached.setAccessibleName("Models in the Hugging Face cache")
        for model in cached_models(cache):
            item = QListWidgetItem(model.repo_id)
            item.setData(Qt.ItemDataRole.UserRole, str(model.folder))
            self.cached.addItem(item)
        if self.cached.count() == 0:
            self.cached.setEnabled(False)
            self.cached.addItem("(no models in the Hugging Face cache)")
        self.cached.currentItemChanged.connect(
            lambda item, _: item is not None and self.folder.setText(item.data(Qt.ItemDataRole.UserRole)))
        self.budget = QSpinBox(minimum=1, maximum=100, value=50, suffix=" % of experts")
        self.budget.setAccessibleName("Starting budget")
        self.context = QSpinBox(minimum=256, maximum=262144, value=4096, singleStep=1024, suffix=" tokens")
        self.context.setAccessibleName("Context length")
        self.report = QLabel("Choose a model folder.")
        self.report.setWordWrap(True)
        self.report.setAccessibleName("Fit report")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Open | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Budget", self.budget)
        form.addRow("Context", self.context)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(QLabel("In the Hugging Face cache:"))
        layout.addWidget(self.cached)
        layout.addLayout(form)
        layout.addWidget(self.report)
        layout.addWidget(self.buttons)
        for signal in (self.folder.textChanged, self.budget.valueChanged, self.context.valueChanged):
            signal.connect(self.update_report)
        self.update_report()

    def chosen(self) -> tuple[str, str]:
        return self.folder.text().strip(), f"{self.budget.value()}%"

    def update_report(self) -> None:
        """Re-read sizes for the current choice; Open is enabled only for a loadable model."""
        open_button = self.buttons.button(QDialogButtonBox.StandardButton.Open)
        folder = self.folder.text().strip()
        if not folder:
            open_button.setEnabled(False)
            return
        try:
            r = fit_report(folder, f"{self.budget.value()}%", self.context.value())
        except ExpertSwapError as exc:
            self.report.setText(f"Cannot use this folder: {exc}")
            open_button.setEnabled(False)
            return
        free = f"free RAM {format_bytes(r.free_ram_bytes)}"
        if r.free_vram_bytes is not None:
            free += f", free VRAM {format_bytes(r.free_vram_bytes)}"
        lines = [
            f"{r.family}: weights outside the experts {format_bytes(r.non_expert_bytes)}; all experts "
            f"{format_bytes(r.total_expert_bytes)}; minimum budget {format_bytes(r.minimum_budget_bytes)}.",
            f"At this budget: experts {format_bytes(r.budget_bytes)}, KV cache {format_bytes(r.kv_cache_bytes)} "
            f"at {r.context_tokens} tokens; {free}.",
            r.warning() or "It fits.",
        ]
        self.report.setText("\n".join(lines))
        open_button.setEnabled(r.budget_bytes >= r.minimum_budget_bytes)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (config.json + safetensors)")
        if folder:
            self.folder.setText(folder)
