"""The main window: conversations, chat and reply settings on the left; budget, expert map, swap log right.

It lays the widgets out and wires them: the chat's state machine is ``ChatController`` and the engine is
reached only through ``EngineSession``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TypeVar

from PySide6.QtCore import QSettings, QStandardPaths, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QProgressDialog,
    QPushButton,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from expertswap import __version__
from expertswap.app import theme
from expertswap.app.budget_panel import BudgetPanel
from expertswap.app.charts import Charts
from expertswap.app.chat_controller import ChatController
from expertswap.app.chat_view import ChatView
from expertswap.app.connect_dialog import ConnectDialog
from expertswap.app.conversations import ConversationStore, Removed
from expertswap.app.expert_map import ExpertMap, MapLegend
from expertswap.app.history_panel import HistoryPanel
from expertswap.app.message_box import MessageBox
from expertswap.app.models_dialog import ModelsDialog
from expertswap.app.ops import run_op, show_error
from expertswap.app.reply_settings import ReplySettings
from expertswap.app.session import EngineSession
from expertswap.app.swap_log import SwapLog
from expertswap.models import DEFAULT_MODEL, default_budget
from expertswap.protocol import (
    BudgetChange,
    ExpertSwapError,
    MemorySample,
    PackProgress,
    ResidencySnapshot,
    TokenStats,
    format_bytes,
)

T = TypeVar("T")


def model_label(model: str) -> str:
    """The model's name as a user knows it: the built-in model's, a Hugging Face cache snapshot's repository
    (``models--org--name/snapshots/<hash>``: org/name), else the folder's."""
    if model == DEFAULT_MODEL:
        return "built-in model (SmolLM2 MoE)"
    path = Path(model)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name or model


KEY_IDEAS = (
    "ExpertSwap runs Mixture-of-Experts models on machines too small to hold them.\n\n"
    "• A committee of experts per MoE layer stays resident under a memory budget; the rest are swapped in from "
    "RAM or the model's files as tokens need them (SwapMoE's virtual experts, PC-MoE's parameter committee).\n"
    "• The budget slider resizes the committees live, also mid-reply.\n"
    "• The exact policy gives the model's own output at every budget; substitute, skip, cpu and lowbit trade "
    "exactness for speed, and say so.\n"
    "• The expert map shows which experts are resident (blue) and which were just swapped (orange); the swap log "
    "says why each moved.\n"
    "• A conversation continues from its cache: each turn reads only its new tokens.")


def about() -> str:
    return (f"<b>ExpertSwap {__version__}</b><p>Chat with Mixture-of-Experts models on machines too "
            "small to hold them: a committee of experts per layer under a memory budget, the rest swapped in "
            "as needed.</p>"
            "<p>Runs on this machine; nothing is sent anywhere. Models: safetensors only, no remote code.</p>")


def export_path(store: ConversationStore, conversation: int) -> Path:
    """Where an export is offered: the documents folder, named by the conversation's title."""
    title = store.get(conversation).title if store.exists(conversation) else "conversation"
    name = "".join(c if c.isalnum() or c in " -_" else " " for c in title).strip()[:60] or "conversation"
    folder = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation) or Path.home())
    return folder / f"{' '.join(name.split())}.md"


def default_store() -> ConversationStore:
    """conversations.sqlite3 in the platform's app-data folder."""
    folder = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation))
    return ConversationStore(folder / "conversations.sqlite3")


class MainWindow(QMainWindow):
    """Wires the widgets to one EngineSession and one ConversationStore."""

    closed = Signal()  # after closeEvent has saved everything

    def __init__(self, session: EngineSession | None = None, store: ConversationStore | None = None,
                 settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("ExpertSwap")
        self.session = session or EngineSession(self)
        self.store = store or default_store()
        self.state = settings or QSettings("ExpertSwap", "ExpertSwap")
        self.model_name = ""  # what load_model was given: reopened at the next start
        self.model_label = ""  # what the user reads: the model's name
        self.theme = "system"
        self._pace = ""  # the latest reply's speed and hit rate, kept in the status bar until the next reply
        self._packing = ""  # the packed expert file's progress, or why it stopped, while it is news
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._progress: QProgressDialog | None = None
        self._build_started = 0.0
        self._loading: tuple[str, float] | None = None  # the model loading and since when
        self._loading_timer = QTimer(self, interval=1000)
        self._loading_timer.timeout.connect(self._show_loading)
        self.loading_bar = QProgressBar()
        self.loading_bar.setRange(0, 0)  # busy: loading reports no fraction
        self.loading_bar.setMaximumWidth(120)
        self.loading_bar.setAccessibleName("Loading")
        self.loading_bar.hide()
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setAccessibleName("Notice")
        self.notice.setStyleSheet("QLabel { background: #fff3cd; color: #664d03; padding: 6px; }")
        self.notice.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.undo_button = QPushButton("Undo")
        self.undo_button.setAccessibleName("Undo the delete")
        self.undo_button.hide()
        self._removed: Removed | None = None  # the conversation deleted last, until Undo or the next notice

        self.history = HistoryPanel(self.store)
        self.chat = ChatView()
        self.reply_settings = ReplySettings()
        self.prompt = MessageBox()
        self.prompt.setMaximumHeight(110)
        self.send_button = QPushButton("Send")
        self.send_button.setAccessibleName("Send message")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAccessibleName("Stop reply")
        self.stop_button.setEnabled(False)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Answer the last message again")
        self.regenerate_button.setAccessibleName("Regenerate the last reply")
        self.edit_button = QPushButton("Edit")
        self.edit_button.setToolTip("Put the last message back in the box to change it (its reply goes)")
        self.edit_button.setAccessibleName("Edit the last message")
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the last reply")
        self.copy_button.setAccessibleName("Copy the last reply")
        self.budget = BudgetPanel()
        self.map = ExpertMap()
        self.log = SwapLog()
        self.charts = Charts()
        self.chat_controller = ChatController(self.store, self.session, self.chat, self, self.spawn)
        self._build_layout()
        self._connect()
        self.show_replying(False, False, True)  # an empty chat: nothing to regenerate, edit or copy
        self._restore_state()
        self.store.on_problem = lambda _problem: self.notify("")
        self.notify(" ".join(self.store.notices))

    def _build_layout(self) -> None:
        buttons = QHBoxLayout()
        for button in (self.copy_button, self.edit_button, self.regenerate_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)
        chat_box = QWidget()
        chat_layout = QVBoxLayout(chat_box)
        notice_row = QHBoxLayout()
        notice_row.addWidget(self.notice, 1)
        notice_row.addWidget(self.undo_button)
        chat_layout.addLayout(notice_row)
        chat_layout.addWidget(self.chat, 1)
        chat_layout.addWidget(self.prompt)
        chat_layout.addLayout(buttons)
        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(chat_box)
        left.addWidget(self.reply_settings)
        left.setSizes([640, 120])
        self.legend = MapLegend()
        map_box = QWidget()
        map_layout = QVBoxLayout(map_box)
        map_layout.setContentsMargins(0, 0, 0, 0)
        map_layout.addWidget(self.map, 1)
        map_layout.addWidget(self.legend)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.budget)
        right.addWidget(map_box)
        tabs = QTabWidget()
        tabs.addTab(self.log, "Swap log")
        tabs.addTab(self.charts, "Memory and speed")
        right.addWidget(tabs)
        right.setSizes([200, 250, 230])  # the budget panel's rows need their height: squeezed, its labels overlap
        self.splitter = QSplitter()
        self.splitter.addWidget(self.history)
        self.splitter.addWidget(left)
        self.splitter.addWidget(right)
        self.splitter.setSizes([200, 560, 460])
        self.splitter.setChildrenCollapsible(False)
        self.setCentralWidget(self.splitter)
        self.resize(1280, 800)
        self.statusBar().addPermanentWidget(self.loading_bar)
        self.statusBar().showMessage("No model loaded")

    def _connect(self) -> None:
        chat = self.chat_controller
        self.send_button.clicked.connect(self.send)
        self.prompt.submitted.connect(self.send)
        self.reply_settings.enter_sends.toggled.connect(self.prompt.set_enter_sends)
        self.stop_button.clicked.connect(chat.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        self.edit_button.clicked.connect(self.edit_last)
        self.copy_button.clicked.connect(self.copy_last_reply)
        for keys, action in ((QKeySequence("Ctrl+Return"), self.send), (QKeySequence(Qt.Key.Key_Escape), chat.stop),
                             (QKeySequence(QKeySequence.StandardKey.Find), self.history.search.setFocus)):
            QShortcut(keys, self).activated.connect(action)
        file = self.menuBar().addMenu("&File")
        file.addAction("&New chat", QKeySequence.StandardKey.New, chat.new_chat)
        file.addAction("&Export conversation…", QKeySequence("Ctrl+E"), self._export_current)
        file.addSeparator()
        file.addAction("&Quit", QKeySequence.StandardKey.Quit, self.close)
        menu = self.menuBar().addMenu("&Model")
        menu.addAction("&Open model…", QKeySequence.StandardKey.Open, self.choose_model)
        menu.addAction("Open the &default model", lambda: self.spawn(self.load_model(DEFAULT_MODEL)))
        menu.addSeparator()
        menu.addAction("&Connect to server…", self.choose_server)
        self.serve_action = menu.addAction("&Serve over the OpenAI API", self.toggle_serving)
        self.serve_action.setCheckable(True)
        self.serve_action.setEnabled(False)
        view = self.menuBar().addMenu("&View")
        themes = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for name, label in zip(theme.THEMES, ("Follow the &system", "&Light", "&Dark"), strict=True):
            choice = view.addAction(label, functools.partial(self.set_theme, name))
            choice.setCheckable(True)
            themes.addAction(choice)
            self.theme_actions[name] = choice
        QGuiApplication.styleHints().colorSchemeChanged.connect(lambda _scheme: self.set_theme(self.theme))
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction("&Key ideas", lambda: QMessageBox.information(self, "Key ideas", KEY_IDEAS))
        help_menu.addAction("&About ExpertSwap", lambda: QMessageBox.about(self, "About ExpertSwap", about()))
        self.undo_button.clicked.connect(self._undo_delete)
        self.budget.budget_requested.connect(self.session.set_budget)
        self.budget.policy_changed.connect(self._set_policy)
        self.budget.follow.toggled.connect(self.session.follow_free_memory)
        self.history.opened.connect(chat.open)
        self.history.new_requested.connect(chat.new_chat)
        self.history.export_requested.connect(self._ask_export)
        self.history.delete_requested.connect(self._delete)
        s = self.session
        s.reply_chunk.connect(chat.add_chunk)
        s.trimmed.connect(chat.trimmed)
        s.residency.connect(self._show_residency)
        s.swaps.connect(self.map.flash_swaps)
        s.swaps.connect(self.log.add)
        s.token_stats.connect(self._show_stats)
        s.reply_finished.connect(self._reply_finished)
        s.token_stats.connect(self.charts.add_token)
        s.memory.connect(self.charts.add_memory)
        s.memory.connect(self._show_memory)
        s.budget.connect(self._budget_changed)
        s.packing.connect(self._show_packing)
        s.load_failed.connect(self._load_failed)
        s.build_progress.connect(self._build_progress)
        s.problem.connect(self.notify)

    # ---- window state ------------------------------------------------------------------------
    def _restore_state(self) -> None:
        if (geometry := self.state.value("geometry")) is not None:
            self.restoreGeometry(geometry)
        if (splitter := self.state.value("splitter")) is not None:
            self.splitter.restoreState(splitter)
        self.reply_settings.enter_sends.setChecked(bool(self.state.value("enter_sends", False, type=bool)))
        chosen = str(self.state.value("theme", "system"))
        self.set_theme(chosen if chosen in theme.THEMES else "system")

    def _save_state(self) -> None:
        self.state.setValue("geometry", self.saveGeometry())
        self.state.setValue("splitter", self.splitter.saveState())
        self.state.setValue("enter_sends", self.reply_settings.enter_sends.isChecked())
        self.state.setValue("theme", self.theme)
        if self.session.is_local:  # a remote model is not reopened at the next start
            stats = self.session.stats()
            self.state.setValue("model", self.model_name)
            self.state.setValue("budget", f"{100 * stats.budget_bytes / stats.total_expert_bytes:.2f}%")
        self.state.sync()

    def set_theme(self, name: str) -> None:
        """View > light, dark or the system's; every panel repaints from the new palette."""
        self.theme = name
        self.theme_actions[name].setChecked(True)
        theme.apply(name)
        self.map.update()

    # ---- model ---------------------------------------------------------------------------------
    async def load_model(self, model: str, budget: str | None = None, quantize: str | None = None) -> bool:
        """Load ``model`` locally at ``budget`` (default: the model's own starting budget); the status bar counts the
        seconds and Send waits until it is done."""
        self._loading = (model_label(model), time.monotonic())
        self._show_loading()
        self._loading_timer.start()
        self.send_button.setEnabled(False)
        try:
            ok = await self.session.load(model, budget or default_budget(model), self.budget.policy.currentText(),
                                         quantize)
        finally:
            self._loading = None
            self._loading_timer.stop()
            self.loading_bar.hide()
            self.send_button.setEnabled(not self.chat_controller.replying_here)
            if self._progress is not None:
                self._progress.close()
                self._progress = None
        if not ok:
            return False
        self.model_name, self.model_label = model, model_label(model)
        self._engine_changed()
        return True

    async def connect_server(self, url: str, api_key: str = "") -> bool:
        """Chat through an OpenAI-compatible server; the panels follow it when it is ExpertSwap's."""
        self.statusBar().showMessage(f"Connecting to {url}…")
        if not await self.session.connect_server(url, api_key):
            return False
        self.model_name = ""
        self.model_label = f"{self.session.remote_model} (remote)"
        self._engine_changed()
        return True

    def _engine_changed(self) -> None:
        """Set the panels up for the engine just adopted, local or remote; the map fills from its first residency,
        which a local engine has already queued (shown here at once) and a server sends with its first poll."""
        s = self.session
        self._pace = self._packing = ""
        self.setWindowTitle(f"ExpertSwap · {self.model_label}")
        self._stop_serving()
        self.serve_action.setEnabled(s.is_local)
        self.budget.follow.setEnabled(s.is_local)
        self.log.set_layers([])  # the old engine's swaps go; the layers come with the first residency
        self.charts.set_gpu(s.engine_device.startswith("cuda"))
        if reason := s.panels_unavailable:
            self.budget.unavailable(reason)
            self.map.unavailable(reason)
        else:
            stats = s.stats()
            self.budget.configure(stats.minimum_budget_bytes, stats.total_expert_bytes, stats.budget_bytes,
                                  s.total_experts, s.committee_size, s.policies, s.policy)
        self._status()
        s.drain()

    def _show_residency(self, snapshot: ResidencySnapshot) -> None:
        self.map.show_residency(snapshot)
        if self.log.layers != self.map.layers:  # a new engine's first snapshot
            self.log.set_layers(self.map.layers)

    def choose_server(self) -> None:
        """Model > Connect to server…: a base URL and an optional API key."""
        dialog = ConnectDialog(self, str(self.state.value("server", "http://127.0.0.1:8000/v1")))
        if dialog.exec() == ConnectDialog.DialogCode.Accepted:
            url, key = dialog.chosen()
            self.state.setValue("server", url)
            self.spawn(self.connect_server(url, key))

    def toggle_serving(self) -> None:
        """Model > Serve over the OpenAI API: start (showing the URL) or stop serving the loaded model."""
        if self.session.server is not None:
            self._stop_serving()
            return
        try:
            url = self.session.serve(self.model_label or "model")
        except (OSError, ExpertSwapError) as exc:
            self.serve_action.setChecked(False)
            show_error(self, exc, "Could not serve the model")
            return
        self.serve_action.setChecked(True)
        self._status()
        self.notify(f"Serving {self.model_label} at {url} (OpenAI API, this machine only). Point any "
                     "OpenAI client there; replies take turns with this window's.")

    def _stop_serving(self) -> None:
        if self.session.server is not None:
            self.session.stop_serving()
            self.notify("")
        self.serve_action.setChecked(False)
        self._status()

    def choose_model(self) -> None:
        """The models dialog (folder or HF cache, fit report); loads the choice if accepted."""
        dialog = ModelsDialog(self)
        if dialog.exec() == ModelsDialog.DialogCode.Accepted:
            folder, budget, quantize = dialog.chosen()
            self.spawn(self.load_model(folder, budget, quantize))

    def _show_loading(self) -> None:
        """The status bar while a model loads: its name, the seconds so far, a busy bar."""
        if self._loading is None:
            return
        name, since = self._loading
        self.statusBar().showMessage(f"Loading {name}… {time.monotonic() - since:.0f} s")
        self.loading_bar.show()

    def _build_progress(self, stage: str, done: int, total: int) -> None:
        if stage == "checking":
            return
        if self._progress is None:
            self._progress = QProgressDialog("Building the default model (first launch only)…", "Cancel", 0, 100,
                                             self)
            self._progress.setWindowModality(Qt.WindowModality.WindowModal)
            self._progress.setMinimumDuration(0)
            self._progress.canceled.connect(self.session.cancel_build)
            self._build_started = time.monotonic()
        share = done / max(total, 1)
        value = 0.9 * share if stage == "reading GGUF" else 0.9 + 0.1 * share
        elapsed = time.monotonic() - self._build_started
        left = f", about {elapsed * (1 - value) / value:.0f} s left" if value > 0.02 and elapsed > 1 else ""
        self._progress.setLabelText(f"Building the default model (first launch only): {stage}{left}")
        self._progress.setValue(int(100 * value))

    def _load_failed(self, message: str) -> None:
        if not self.session.ready:
            self.statusBar().showMessage("Model not loaded")
        else:
            self._status()  # the engine before stays, and says so
        if not message:  # the user cancelled the build
            self.notify("The default model's build was cancelled; Model > Open the default model starts it again.")
            return
        QMessageBox.warning(self, "Could not load the model", message)

    # ---- chat: the controller decides, the window gives it the input box, settings and clipboard ---------
    def send(self) -> None:
        if self._loading is not None:
            self.statusBar().showMessage(f"{self._loading[0]} is still loading; the message stays in the box")
            return
        if self.chat_controller.send(self.prompt.toPlainText(), self.reply_settings.system.text().strip(),
                                     self.reply_settings.sampling()):
            self.prompt.clear()

    def regenerate(self) -> None:
        self.chat_controller.regenerate(self.reply_settings.sampling())

    def edit_last(self) -> None:
        """Put the last message back in the input box and forget it and its reply."""
        if (text := self.chat_controller.edit_last()) is not None:
            self.prompt.setPlainText(text)

    def copy_last_reply(self) -> None:
        if (text := self.chat_controller.last_reply()) is not None:
            QApplication.clipboard().setText(text)

    # ---- the frame the controller shows its state in ---------------------------------------------------
    def notify(self, text: str, undo: Removed | None = None) -> None:
        """The notice above the chat: the store's lasting problem, then the latest one-off news (with Undo for a
        deleted conversation: any later notice ends the chance)."""
        shown = "\n".join(filter(None, [self.store.problem, text]))
        self.notice.setText(shown)
        self.notice.setVisible(bool(shown))
        self._removed = undo
        self.undo_button.setVisible(undo is not None)

    def _delete(self, conversation: int) -> None:
        """Delete at once, with Undo in the notice."""
        title = self.store.get(conversation).title if self.store.exists(conversation) else ""
        removed = self.chat_controller.delete(conversation)
        if removed is not None:
            self.notify(f"Deleted “{title}”.", undo=removed)

    def _undo_delete(self) -> None:
        if (removed := self._removed) is None:
            return
        self.store.restore(removed)
        self.notify("")
        self.history.refresh()
        self.chat_controller.open(removed.conversation[0])

    def show_status(self, text: str) -> None:
        self.statusBar().showMessage(text)

    def show_replying(self, here: bool, anywhere: bool, empty: bool) -> None:
        self.send_button.setEnabled(not here and self._loading is None)
        self.stop_button.setEnabled(here)
        for button in (self.regenerate_button, self.edit_button):
            button.setEnabled(not anywhere and not empty)
        self.copy_button.setEnabled(not empty)

    def conversations_changed(self) -> None:
        self.history.refresh()

    def export_conversation(self, conversation: int, path: Path) -> None:
        path.write_text(self.store.to_markdown(conversation), encoding="utf-8")

    def _export_current(self) -> None:
        """File > Export: the conversation on screen, else the one selected in the list."""
        conversation = self.chat_controller.conversation or self.history.current_id()
        if conversation is not None:
            self._ask_export(conversation)

    def _ask_export(self, conversation: int) -> None:
        name, _ = QFileDialog.getSaveFileName(self, "Export conversation", str(export_path(self.store, conversation)),
                                              "Markdown (*.md)")
        if name:
            text = self.store.to_markdown(conversation)
            run_op(self, lambda: Path(name).write_text(text, encoding="utf-8")).with_progress("Exporting…").success(
                lambda _: self.statusBar().showMessage(f"Exported to {name}")).start()

    def _budget_changed(self, event: BudgetChange) -> None:
        if not event.applied:
            return
        if event.reason == "user":
            self.budget.show_budget(event.new_bytes)
            return
        self.budget.follow_engine(event.new_bytes)
        if event.reason == "oom":
            self.notify(f"Out of memory: the budget was lowered to {format_bytes(event.new_bytes)} "
                         "and the token was computed again.")

    def _set_policy(self, policy: str, skip_threshold: float) -> None:
        if error := self.session.set_policy(policy, skip_threshold):
            self.statusBar().showMessage(f"Policy not changed: {error}")
            return
        self._status()

    # ---- status --------------------------------------------------------------------------------
    def _show_stats(self, stats: TokenStats) -> None:
        self._pace = f"{stats.tokens_per_s:.1f} tok/s · hit rate {stats.hit_rate:.0%} this reply"
        self._status()

    def _show_memory(self, sample: MemorySample) -> None:
        if self.session.ready:
            self.budget.show_memory(sample, self.session.engine_device.startswith("cuda"))

    def _reply_finished(self, _outcome: str) -> None:
        """The reply's time to first token, and how much of its prompt the last turn's cache held."""
        if not self.session.ready:
            return
        stats = self.session.stats()
        first = f"first token {stats.time_to_first_token_s:.2f} s"
        if stats.cached_prompt_tokens:
            first += f" ({stats.cached_prompt_tokens} of {stats.prompt_tokens} prompt tokens from the cache)"
        self._pace = " · ".join(filter(None, [self._pace, first]))
        self._status()

    def _status(self) -> None:
        s = self.session
        if not s.ready:
            return
        parts = [self.model_label, s.engine_device]
        parts += [s.policy] if not s.panels_unavailable else []
        if s.server is not None:
            parts.append(f"serving at {s.server.url}")
        if s.quantize:
            parts.append(f"{s.quantize} experts: not the original model")
        elif s.native_format:
            parts.append(f"{s.native_format} experts, as the checkpoint ships them")
        parts += [p for p in (self._pace, self._packing) if p]
        self.statusBar().showMessage(" · ".join(parts))

    def _show_packing(self, progress: PackProgress) -> None:
        """Packed experts are written in the background; the status bar says how far, or why it stopped."""
        if progress.error:
            self._packing = f"packed experts not written: {progress.error}"
        elif progress.layers_done < progress.layers:
            self._packing = f"packing experts {progress.layers_done}/{progress.layers} layers"
        else:
            self._packing = ""
        self._status()

    def spawn(self, coroutine: Coroutine[object, object, T]) -> asyncio.Task[T]:
        """Run ``coroutine`` on the loop, remembered until it ends so that closing can wait for it."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def settled(self) -> None:
        """Wait for every task of this window to end (after closing: a stopped reply, a load in flight)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._closing:
            self.session.close()  # a load that finished after the window closed

    def closeEvent(self, event) -> None:
        """Save the reply in progress as it stands, stop the engine, then close the store."""
        self._closing = True
        self._save_state()
        self.chat_controller.close()
        self.session.close()  # waits for the current token, so nothing writes after this
        self.store.close()
        super().closeEvent(event)
        self.closed.emit()
