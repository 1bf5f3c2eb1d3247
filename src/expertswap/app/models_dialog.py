"""Pick a model: a local folder or one in the Hugging Face cache, with a fit report before loading."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from expertswap.models import (
    FitReport,
    cache_root,
    cached_models,
    download,
    downloaded_models,
    fit_report,
)
from expertswap.protocol import DEFAULT_BUDGET_PERCENT, QUANTIZATIONS, format_bytes

from .ops import describe, run_op

AS_STORED = "as stored"  # the quantisation choice that keeps the experts as the checkpoint stores them
REPORT_DELAY_MS = 250


class ModelsDialog(QDialog):
    """``chosen()`` gives (folder, budget, quantisation) once accepted; Open stays disabled until it can load."""

    download_progress = Signal(int, int)
    download_finished = Signal(str, str)  # folder, error ("" when it worked)

    def __init__(self, parent=None, cache: Path | None = None, downloads: Path | None = None,
                 endpoint: str | None = None) -> None:
        super().__init__(parent)
        self.downloads = downloads or cache_root() / "models"
        self.endpoint = endpoint
        self._cancel = threading.Event()
        self.download_task: asyncio.Task | None = None
        self.report_task: asyncio.Task | None = None
        self._asked = 0  # report requests so far: only the newest answer is shown
        self._debounce = QTimer(self, singleShot=True, interval=REPORT_DELAY_MS)
        self._debounce.timeout.connect(self._ask_report)
        self.setWindowTitle("Open a model")
        self.folder = QLineEdit()
        self.folder.setAccessibleName("Model folder")
        browse = QPushButton("Browse…")
        browse.setAccessibleName("Browse for a model folder")
        browse.clicked.connect(self._browse)
        self.cached = QListWidget()
        self.cached.setAccessibleName("Models in the Hugging Face cache")
        for model in downloaded_models(self.downloads) + cached_models(cache):
            item = QListWidgetItem(model.repo_id)
            item.setData(Qt.ItemDataRole.UserRole, str(model.folder))
            self.cached.addItem(item)
        if self.cached.count() == 0:
            self.cached.setEnabled(False)
            self.cached.addItem("(no downloaded models yet)")
        self.cached.currentItemChanged.connect(self._cached_chosen)
        self.repo = QLineEdit()
        self.repo.setPlaceholderText("Hugging Face repo id, e.g. allenai/OLMoE-1B-7B-0924")
        self.repo.setAccessibleName("Repo id to download")
        self.download_button = QPushButton("Download")
        self.download_button.setAccessibleName("Download the model")
        self.cancel_download = QPushButton("Stop")
        self.cancel_download.setAccessibleName("Stop the download")
        self.cancel_download.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setAccessibleName("Download progress")
        self.download_button.clicked.connect(self.start_download)
        self.cancel_download.clicked.connect(self._cancel.set)
        self.download_progress.connect(self._show_progress)
        self.budget = QSpinBox(minimum=1, maximum=100, value=DEFAULT_BUDGET_PERCENT, suffix=" % of experts")
        self.budget.setAccessibleName("Starting budget")
        self.quantize = QComboBox()
        self.quantize.addItems([AS_STORED, *QUANTIZATIONS])
        self.quantize.setAccessibleName("Expert quantisation")
        self.quantize.setToolTip("Quantised experts: more of them fit a budget, but the replies are no longer the "
                                 "original model's")
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
        form.addRow("Experts", self.quantize)
        form.addRow("Context", self.context)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(QLabel("On this machine (downloads and the Hugging Face cache):"))
        layout.addWidget(self.cached)
        fetch = QHBoxLayout()
        fetch.addWidget(self.repo, 1)
        fetch.addWidget(self.download_button)
        fetch.addWidget(self.cancel_download)
        layout.addLayout(fetch)
        layout.addWidget(self.progress)
        layout.addLayout(form)
        layout.addWidget(self.report)
        layout.addWidget(self.buttons)
        for signal in (self.folder.textChanged, self.budget.valueChanged, self.context.valueChanged,
                       self.quantize.currentTextChanged):
            signal.connect(self.update_report)
        self.update_report()

    def done(self, result: int) -> None:
        """Closing ends the typing pause too: a closed dialog starts no report."""
        self._debounce.stop()
        super().done(result)

    def chosen(self) -> tuple[str, str, str | None]:
        """The folder, the starting budget and the expert quantisation (None: as stored)."""
        return self.folder.text().strip(), f"{self.budget.value()}%", self._quantize()

    def _quantize(self) -> str | None:
        text = self.quantize.currentText()
        return None if text == AS_STORED else text

    def update_report(self) -> None:
        """Re-read sizes for the current choice off the GUI thread; Open is enabled only for a loadable model.

        Typing a path asks again on every keystroke, so the request waits for a pause and only the
        newest answer is shown.
        """
        self._asked += 1
        self._open_button().setEnabled(False)
        if not self.folder.text().strip():
            self.report.setText("Choose a model folder.")
            return
        self.report.setText("Checking this folder…")
        self._debounce.start()

    def _cached_chosen(self, item: QListWidgetItem | None, _previous: QListWidgetItem | None) -> None:
        if item is not None:
            self.folder.setText(item.data(Qt.ItemDataRole.UserRole))

    def _ask_report(self) -> None:
        asked, folder = self._asked, self.folder.text().strip()
        budget, context, quantize = f"{self.budget.value()}%", self.context.value(), self._quantize()
        def shown(report: FitReport) -> None:
            if asked == self._asked:  # not overtaken by a newer request
                self._show_report(report)

        def failed(exc: BaseException) -> None:
            if asked == self._asked:
                self.report.setText(f"Cannot use this folder: {describe(exc)}")

        self.report_task = run_op(self, lambda: fit_report(folder, budget, context, quantize=quantize)).success(
            shown).failure(failed).start()

    def _show_report(self, r: FitReport) -> None:
        free = f"free RAM {format_bytes(r.free_ram_bytes)}"
        if r.free_vram_bytes is not None:
            free += f", free VRAM {format_bytes(r.free_vram_bytes)}"
        lines = [
            (f"{r.family}: weights outside the experts {format_bytes(r.non_expert_bytes)}; all experts "
            f"{format_bytes(r.total_expert_bytes)}; minimum budget {format_bytes(r.minimum_budget_bytes)}."),
            (f"At this budget: experts {format_bytes(r.budget_bytes)}, KV cache {format_bytes(r.kv_cache_bytes)} "
            f"at {r.context_tokens} tokens; {free}."),
            r.warning() or "It fits.",
        ]
        if kind := self._quantize():
            lines.append(f"Experts quantised as {kind} when read: sizes above are {kind} bytes; the replies are the "
                         "quantised model's, not the original's.")
        self.report.setText("\n".join(lines))
        self._open_button().setEnabled(r.budget_bytes >= r.minimum_budget_bytes)

    def _open_button(self) -> QPushButton:
        return self.buttons.button(QDialogButtonBox.StandardButton.Open)

    def start_download(self) -> None:
        """Fetch the repo in a worker thread; a stopped download resumes when started again."""
        repo = self.repo.text().strip()
        if not repo or self.download_task is not None:
            return
        self._cancel.clear()
        self.download_button.setEnabled(False)
        self.cancel_download.setEnabled(True)
        self.progress.setFormat(f"{repo}: %p%")

        def work() -> Path:
            return download(repo, self.downloads / repo.replace("/", "--"), self.download_progress.emit,
                            self._cancel, endpoint=self.endpoint)

        self.download_task = run_op(self, work).success(lambda folder: self._download_done(str(folder), "")).failure(
            lambda exc: self._download_done("", describe(exc))).start()

    def _show_progress(self, done: int, total: int) -> None:
        scale = max(total // 1_000_000, 1)  # QProgressBar holds ints
        self.progress.setRange(0, max(total // scale, 1))
        self.progress.setValue(done // scale)

    def _download_done(self, folder: str, error: str) -> None:
        self.download_task = None
        self.download_button.setEnabled(True)
        self.cancel_download.setEnabled(False)
        if error:
            self.report.setText(f"Download failed: {error}")
        else:
            self.folder.setText(folder)
        self.download_finished.emit(folder, error)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (config.json + safetensors)")
        if folder:
            self.folder.setText(folder)
