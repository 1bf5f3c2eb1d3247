"""The main window: conversations, chat and reply settings on the left; budget, expert map, swap log right."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import TypeVar

from PySide6.QtCore import QSettings, QStandardPaths, Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QProgressDialog,
    QPushButton,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from expertswap.engine import Engine, dropped_notice
from expertswap.models import DEFAULT_MODEL, default_budget
from expertswap.protocol import ExpertSwapError, format_bytes

from .budget_panel import BudgetPanel
from .charts import Charts
from .chat_view import ChatView
from .connect_dialog import ConnectDialog
from .conversations import ConversationStore
from .expert_map import ExpertMap
from .history_panel import HistoryPanel
from .models_dialog import ModelsDialog
from .ops import run_op, show_error
from .reply_settings import ReplySettings
from .reply_turn import ReplyTurn
from .session import EngineSession
from .swap_log import SwapLog

TITLE_CHARS = 48
T = TypeVar("T")


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
        self.messages: list[dict[str, str]] = []
        self.conversation: int | None = None
        self.model_name = ""
        self._reply_task: asyncio.Task | None = None
        self.turn: ReplyTurn | None = None
        self._turn_in_view = False  # the view's last message is the streaming reply
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._waiting = False  # a sent message waits for a stopping reply (the engine runs one at a time)
        self._progress: QProgressDialog | None = None
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setAccessibleName("Notice")
        self.notice.setStyleSheet("QLabel { background: #fff3cd; color: #664d03; padding: 6px; }")
        self.notice.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.history = HistoryPanel(self.store)
        self.chat = ChatView()
        self.reply_settings = ReplySettings()
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Message (Ctrl+Enter to send, Esc to stop)")
        self.prompt.setAccessibleName("Message")
        self.prompt.setMaximumHeight(110)
        self.send_button = QPushButton("Send")
        self.send_button.setAccessibleName("Send message")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAccessibleName("Stop reply")
        self.stop_button.setEnabled(False)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setAccessibleName("Regenerate the last reply")
        self.edit_button = QPushButton("Edit last")
        self.edit_button.setAccessibleName("Edit the last message")
        self.copy_button = QPushButton("Copy reply")
        self.copy_button.setAccessibleName("Copy the last reply")
        self.budget = BudgetPanel()
        self.map = ExpertMap()
        self.log = SwapLog()
        self.charts = Charts()
        self._build_layout()
        self._connect()
        self._restore_state()
        self.store.on_problem = lambda _problem: self._notify("")
        self._notify(" ".join(self.store.notices))

    def _build_layout(self) -> None:
        buttons = QHBoxLayout()
        for button in (self.copy_button, self.edit_button, self.regenerate_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)
        chat_box = QWidget()
        chat_layout = QVBoxLayout(chat_box)
        chat_layout.addWidget(self.notice)
        chat_layout.addWidget(self.chat, 1)
        chat_layout.addWidget(self.prompt)
        chat_layout.addLayout(buttons)
        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(chat_box)
        left.addWidget(self.reply_settings)
        left.setSizes([640, 120])
        legend = QLabel("Expert map: a row per MoE layer, a cell per expert. Blue: resident (darker = more "
                        "important); outlined: used by the latest token; orange: swapped in or out just now. "
                        "Hover a cell for its counts.")
        legend.setWordWrap(True)
        map_box = QWidget()
        map_layout = QVBoxLayout(map_box)
        map_layout.setContentsMargins(0, 0, 0, 0)
        map_layout.addWidget(self.map, 1)
        map_layout.addWidget(legend)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.budget)
        right.addWidget(map_box)
        tabs = QTabWidget()
        tabs.addTab(self.log, "Swap log")
        tabs.addTab(self.charts, "Memory and speed")
        right.addWidget(tabs)
        right.setSizes([150, 260, 260])
        self.splitter = QSplitter()
        self.splitter.addWidget(self.history)
        self.splitter.addWidget(left)
        self.splitter.addWidget(right)
        self.splitter.setSizes([200, 560, 460])
        self.setCentralWidget(self.splitter)
        self.resize(1280, 800)
        self.statusBar().showMessage("No model loaded")

    def _connect(self) -> None:
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.session.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        self.edit_button.clicked.connect(self.edit_last)
        self.copy_button.clicked.connect(self.copy_last_reply)
        for keys, action in ((QKeySequence("Ctrl+Return"), self.send), (QKeySequence(Qt.Key.Key_Escape),
                             self.session.stop), (QKeySequence(QKeySequence.StandardKey.New), self.new_chat)):
            QShortcut(keys, self).activated.connect(action)
        menu = self.menuBar().addMenu("&Model")
        menu.addAction("&Open model…", QKeySequence.StandardKey.Open, self.choose_model)
        menu.addAction("Open the &default model", lambda: self.spawn(self.load_model(DEFAULT_MODEL)))
        menu.addSeparator()
        menu.addAction("&Connect to server…", self.choose_server)
        self.serve_action = menu.addAction("&Serve over the OpenAI API", self.toggle_serving)
        self.serve_action.setCheckable(True)
        self.serve_action.setEnabled(False)
        self.budget.budget_requested.connect(self.session.set_budget)
        self.budget.policy_changed.connect(self._set_policy)
        self.budget.follow.toggled.connect(self.session.follow_free_memory)
        self.history.opened.connect(self.open_conversation)
        self.history.new_requested.connect(self.new_chat)
        self.history.export_requested.connect(self._ask_export)
        self.history.delete_requested.connect(self._delete_conversation)
        s = self.session
        s.reply_chunk.connect(self._on_chunk)
        s.residency.connect(self.map.show_residency)
        s.swap.connect(self.map.flash_swap)
        s.swap.connect(self.log.add)
        s.token_stats.connect(self._show_stats)
        s.token_stats.connect(self.charts.add_token)
        s.memory.connect(self.charts.add_memory)
        s.budget.connect(self._budget_changed)
        s.load_failed.connect(self._load_failed)
        s.build_progress.connect(self._build_progress)
        s.problem.connect(self._notify)
        s.trimmed.connect(self._trimmed)

    # ---- window state ------------------------------------------------------------------------
    def _restore_state(self) -> None:
        if (geometry := self.state.value("geometry")) is not None:
            self.restoreGeometry(geometry)
        if (splitter := self.state.value("splitter")) is not None:
            self.splitter.restoreState(splitter)

    def _save_state(self) -> None:
        self.state.setValue("geometry", self.saveGeometry())
        self.state.setValue("splitter", self.splitter.saveState())
        if isinstance(self.session.engine, Engine):  # a remote model is not reopened at the next start
            stats = self.session.engine.stats()
            self.state.setValue("model", self.model_name)
            self.state.setValue("budget", f"{100 * stats.budget_bytes / stats.total_expert_bytes:.2f}%")
        self.state.sync()

    # ---- model ---------------------------------------------------------------------------------
    async def load_model(self, model: str, budget: str | None = None, quantize: str | None = None) -> bool:
        """Load ``model`` locally at ``budget`` (default: the model's own starting budget)."""
        self.statusBar().showMessage(f"Loading {model}…")
        ok = await self.session.load(model, budget or default_budget(model), self.budget.policy.currentText(),
                                     quantize)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if not ok:
            return False
        self.model_name = model
        self._engine_changed()
        return True

    async def connect_server(self, url: str, api_key: str = "") -> bool:
        """Chat through an OpenAI-compatible server; the panels follow it when it is ExpertSwap's."""
        self.statusBar().showMessage(f"Connecting to {url}…")
        if not await self.session.connect_server(url, api_key):
            return False
        remote = self.session.remote
        assert remote is not None
        self.model_name = f"{remote.model} (remote)"
        self._engine_changed()
        return True

    def _engine_changed(self) -> None:
        """Set the panels up for the engine just adopted, local or remote."""
        engine = self.session.engine
        assert engine is not None
        self._stop_serving()
        self.serve_action.setEnabled(self.session.remote is None)
        self.budget.follow.setEnabled(self.session.remote is None)
        if reason := self.session.panels_unavailable:
            self.budget.unavailable(reason)
            self.map.unavailable(reason)
            self.log.set_layers([])
        else:
            self.budget.configure(engine.minimum_budget_bytes, engine.total_expert_bytes, engine.budget_bytes,
                                  engine.total_experts, engine.committee_size, engine.policies)
            self.log.set_layers(self.map.layers)  # the snapshot the session showed on adopting it (no second read)
        self._status()

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
            url = self.session.serve(Path(self.model_name).name or "model")
        except (OSError, ExpertSwapError) as exc:
            self.serve_action.setChecked(False)
            show_error(self, exc, "Could not serve the model")
            return
        self.serve_action.setChecked(True)
        self._status()
        self._notify(f"Serving {Path(self.model_name).name} at {url} (OpenAI API, this machine only). Point any "
                     "OpenAI client there; replies take turns with this window's.")

    def _stop_serving(self) -> None:
        if self.session.server is not None:
            self.session.stop_serving()
            self._notify("")
        self.serve_action.setChecked(False)
        self._status()

    def choose_model(self) -> None:
        """The models dialog (folder or HF cache, fit report); loads the choice if accepted."""
        dialog = ModelsDialog(self)
        if dialog.exec() == ModelsDialog.DialogCode.Accepted:
            folder, budget, quantize = dialog.chosen()
            self.spawn(self.load_model(folder, budget, quantize))

    def _build_progress(self, stage: str, done: int, total: int) -> None:
        if stage == "checking":
            return
        if self._progress is None:
            self._progress = QProgressDialog("Building the default model (first launch only)…", "", 0, 100, self)
            self._progress.setCancelButton(None)
            self._progress.setWindowModality(Qt.WindowModality.WindowModal)
            self._progress.setMinimumDuration(0)
        share = done / max(total, 1)
        self._progress.setLabelText(f"Building the default model (first launch only): {stage}")
        self._progress.setValue(int(100 * (0.9 * share if stage == "reading GGUF" else 0.9 + 0.1 * share)))

    def _load_failed(self, message: str) -> None:
        if self.session.engine is None:
            self.statusBar().showMessage("Model not loaded")
        else:
            self._status()  # the engine before stays, and says so
        QMessageBox.warning(self, "Could not load the model", message)

    # ---- chat ----------------------------------------------------------------------------------
    def send(self) -> None:
        text = self.prompt.toPlainText().strip()
        if not text:
            return
        if self.session.engine is None:
            self.statusBar().showMessage("Load a model first (Model menu)")
            return
        if self._replying_here():
            return
        self.prompt.clear()
        self._reply_task = self.spawn(self._reply(text, self._reply_task))

    def regenerate(self) -> None:
        """Answer the last message again: drops the last reply, or answers a message left without one."""
        if self._replying() or self.session.engine is None or not self.messages:
            return
        if self.messages[-1]["role"] == "assistant":
            self._truncate(len(self.messages) - 1)
        self._reply_task = self.spawn(self._answer())

    def edit_last(self) -> None:
        """Put the last message back in the input box and forget it and its reply."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if self._replying() or not users:
            return
        self.prompt.setPlainText(self.messages[users[-1]]["content"])
        self._truncate(users[-1])

    def copy_last_reply(self) -> None:
        replies = [m["content"] for m in self.messages if m["role"] == "assistant"]
        if replies:
            QApplication.clipboard().setText(replies[-1])

    def _replying(self) -> bool:
        """A reply streams or is stopping, or a message waits for one to stop."""
        return self.turn is not None or self._waiting

    def _replying_here(self) -> bool:
        """A reply to the conversation on screen is streaming (one for another chat may still be stopping)."""
        return self._waiting or (self.turn is not None and self.turn.conversation == self.conversation)

    def _truncate(self, keep: int) -> None:
        del self.messages[keep:]
        if self.conversation is not None:
            self.store.truncate(self.conversation, keep)
        self._render()

    def _render(self) -> None:
        self._turn_in_view = False
        self.chat.clear()
        for message in self.messages:
            self.chat.add_message(message["role"], message["content"])

    async def _reply(self, text: str, previous: asyncio.Task | None) -> None:
        if previous is not None and not previous.done():  # a reply to another chat is still stopping
            self._waiting = True
            self._update_buttons()
            await asyncio.wait([previous])
            self._waiting = False
        if self._closing:
            return
        if self.conversation is None:
            system = self.reply_settings.system.text().strip()
            self.conversation = self.store.create(text[:TITLE_CHARS], system, first_message=text)
        else:
            self.store.add(self.conversation, "user", text)
        self.messages.append({"role": "user", "content": text})
        self.chat.add_message("user", text)
        await self._answer()

    async def _answer(self) -> None:
        """Stream the assistant's answer; the turn stores it in its own conversation, even when stopped."""
        assert self.conversation is not None
        turn = self.turn = ReplyTurn(self.store, self.conversation)
        system = self.store.get(turn.conversation).system
        context = ([{"role": "system", "content": system}] if system else []) + list(self.messages)
        self.chat.begin_reply()
        self._turn_in_view = True
        self._notify("")
        self._update_buttons()
        try:
            outcome = await self.session.reply(context, self.reply_settings.sampling())
        finally:
            turn.finish()
            self.turn = None
        if self._closing:
            return
        if outcome not in ("done", "stopped"):
            self._notify(f"The reply failed: {outcome}")
        if self.conversation == turn.conversation:  # the window shows exactly what was stored
            self.messages = self.store.messages(turn.conversation)
            if self.chat.texts() != [m["content"] for m in self.messages] or not self._turn_in_view:
                self._render()
        self._turn_in_view = False
        self._update_buttons()
        self.history.refresh()

    def _on_chunk(self, text: str) -> None:
        if self.turn is None:
            return
        self.turn.add(text)
        if self._turn_in_view and self.conversation == self.turn.conversation:
            self.chat.append_chunk(text)

    def _update_buttons(self) -> None:
        here = self._replying_here()
        self.send_button.setEnabled(not here)
        self.stop_button.setEnabled(here)
        for button in (self.regenerate_button, self.edit_button):
            button.setEnabled(not self._replying())

    def new_chat(self) -> None:
        """An empty chat at once; a reply in progress stops and is kept in its own conversation."""
        if self._replying():
            self.session.stop()
        self.conversation = None
        self.messages = []
        self._render()
        self._update_buttons()

    def open_conversation(self, conversation: int) -> None:
        if conversation == self.conversation or not self.store.exists(conversation):
            return
        if self._replying():
            self.session.stop()
        self.conversation = conversation
        self.messages = self.store.messages(conversation)
        self._render()
        self._update_buttons()

    def export_conversation(self, conversation: int, path: Path) -> None:
        path.write_text(self.store.to_markdown(conversation), encoding="utf-8")

    def _ask_export(self, conversation: int) -> None:
        name, _ = QFileDialog.getSaveFileName(self, "Export conversation", "conversation.md", "Markdown (*.md)")
        if name:
            text = self.store.to_markdown(conversation)
            run_op(self, lambda: Path(name).write_text(text, encoding="utf-8")).with_progress("Exporting…").success(
                lambda _: self.statusBar().showMessage(f"Exported to {name}")).start()

    def _delete_conversation(self, conversation: int) -> None:
        if self.turn is not None and self.turn.conversation == conversation:
            self.turn.discard()  # nothing more is written to it
            self.session.stop()
        self.store.delete(conversation)
        if conversation == self.conversation:
            self.new_chat()
        self.history.refresh()

    def _notify(self, text: str) -> None:
        """The notice above the chat: the store's lasting problem, then the latest one-off news."""
        shown = "\n".join(filter(None, [self.store.problem, text]))
        self.notice.setText(shown)
        self.notice.setVisible(bool(shown))

    def _trimmed(self, dropped: int, context: int) -> None:
        """Only what the model reads is cut: the conversation on screen and on disk keeps every turn."""
        self._notify(f"{dropped_notice(dropped, context).capitalize()}: the model no longer reads them, "
                     "this conversation keeps them.")

    def _budget_changed(self, event) -> None:
        if not event.applied:
            return
        if event.reason == "user":
            self.budget.show_budget(event.new_bytes)
            return
        self.budget.follow_engine(event.new_bytes)
        if event.reason == "oom":
            self._notify(f"Out of memory: the budget was lowered to {format_bytes(event.new_bytes)} "
                         "and the token was computed again.")

    def _set_policy(self, policy: str, skip_threshold: float) -> None:
        if error := self.session.set_policy(policy, skip_threshold):
            self.statusBar().showMessage(f"Policy not changed: {error}")
            return
        self._status()

    # ---- status --------------------------------------------------------------------------------
    def _show_stats(self, stats) -> None:
        self._status(f"{stats.tokens_per_s:.1f} tok/s · hit rate {stats.hit_rate:.0%}")

    def _status(self, extra: str = "") -> None:
        engine = self.session.engine
        if engine is None:
            return
        parts = [self.model_name, str(engine.device)]
        parts += [self.budget.policy.currentText()] if not self.session.panels_unavailable else []
        if self.session.server is not None:
            parts.append(f"serving at {self.session.server.url}")
        if engine.quantize:
            parts.append(f"{engine.quantize} experts: not the original model")
        elif engine.native_format:
            parts.append(f"{engine.native_format} experts, as the checkpoint ships them")
        parts += [extra] if extra else []
        self.statusBar().showMessage(" · ".join(parts))

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
        if self.turn is not None:
            self.turn.finish()
        self.session.stop()
        self.session.close()  # waits for the current token, so nothing writes after this
        self.store.close()
        super().closeEvent(event)
        self.closed.emit()
