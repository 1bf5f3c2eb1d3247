"""What a new user meets in the window: its size, menus, the conversation list, the status bar, the panels' words."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from PySide6.QtCore import QStandardPaths, Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QApplication, QMessageBox, QPushButton

from expertswap.app.budget_panel import POLICY_TIPS
from expertswap.app.conversations import FINISH_NOTES, ConversationStore
from expertswap.app.history_panel import when
from expertswap.app.main_window import MainWindow, export_path, model_label
from expertswap.models import DEFAULT_MODEL
from expertswap.protocol import POLICIES, MemorySample, format_bytes

from .conftest import make_window
from .test_app import _run_reply


def test_the_window_fits_1000_pixels_and_the_budget_rows_stay_together_when_tall(qtbot, tmp_path: Path) -> None:
    window = make_window(qtbot, tmp_path)
    window.show()
    assert window.minimumSizeHint().width() <= 1000  # half of a 1920 screen, or a 1024 one
    window.resize(1000, 700)
    qtbot.waitUntil(lambda: window.width() == 1000)
    panel = window.budget
    panel.resize(400, 900)  # a maximised window's right column
    panel.layout().activate()
    assert panel.follow.geometry().bottom() - panel.slider.geometry().top() < 250  # no rows spread over the height


def test_file_and_help_menus_and_quit_with_ctrl_q(qtbot, tmp_path: Path) -> None:
    window = make_window(qtbot, tmp_path)
    window.show()
    menus = {a.text(): a.menu() for a in window.menuBar().actions()}
    assert list(menus) == ["&File", "&Model", "&View", "&Help"]
    file = {a.text(): a for a in menus["&File"].actions() if a.text()}
    assert set(file) == {"&New chat", "&Export conversation…", "&Quit"}
    assert file["&Quit"].shortcut() == QKeySequence(QKeySequence.StandardKey.Quit)
    assert {a.text() for a in menus["&Help"].actions()} == {"&Key ideas", "&About ExpertSwap"}
    file["&Quit"].trigger()
    qtbot.waitUntil(lambda: not window.isVisible())


def test_regenerate_and_edit_wait_for_a_message_and_a_new_chat_is_listed_as_it_starts(window: MainWindow,
                                                                                      loop) -> None:
    assert not window.regenerate_button.isEnabled() and not window.edit_button.isEnabled()
    assert not window.copy_button.isEnabled()
    listed: list[str] = []
    window.session.reply_chunk.connect(
        lambda _: listed.append(window.history.list.item(0).text()) if window.history.list.count() else None)
    window.reply_settings.max_tokens.setValue(4)
    title = "A question whose title is much longer than the conversation list is wide, by far"
    _run_reply(loop, window, title)
    assert listed and listed[0].startswith(title[:40]) and "Today" in listed[0]  # while its reply streamed
    item = window.history.list.item(0)
    assert item.toolTip() == title[:48] and window.history.list.horizontalScrollBarPolicy() == \
        Qt.ScrollBarPolicy.ScrollBarAlwaysOff  # elided, the whole title on hover
    assert window.regenerate_button.isEnabled() and window.edit_button.isEnabled()
    window.chat_controller.new_chat()
    assert not window.regenerate_button.isEnabled() and not window.edit_button.isEnabled()


def test_dates_read_as_people_say_them() -> None:
    now = time.mktime((2026, 12, 3, 15, 0, 0, 0, 0, -1))
    assert when(time.mktime((2026, 12, 3, 9, 5, 0, 0, 0, -1)), now) == "Today 09:05"
    assert when(time.mktime((2026, 12, 2, 23, 59, 0, 0, 0, -1)), now) == "Yesterday 23:59"
    assert when(time.mktime((2026, 3, 7, 12, 0, 0, 0, 0, -1)), now) == "7 Mar"
    assert when(time.mktime((2025, 3, 7, 12, 0, 0, 0, 0, -1)), now) == "7 Mar 2025"


def test_search_says_when_nothing_matches_clears_with_a_button_and_takes_ctrl_f(qtbot, tmp_path: Path) -> None:
    window = make_window(qtbot, tmp_path)
    window.show()
    history = window.history
    assert history.empty.isVisible() and "No conversations yet" in history.empty.text()
    window.store.create("Tuples and lists", first_message="What is a tuple?")
    history.refresh()
    assert history.list.isVisible() and not history.empty.isVisible()
    history.search.setText("dragons")
    assert history.list.count() == 0 and history.empty.text() == "No conversation matches “dragons”."
    assert history.search.isClearButtonEnabled()
    history.search.clear()
    assert history.list.count() == 1
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window)
    window.prompt.setFocus()
    qtbot.keyClick(window.prompt, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(history.search.hasFocus)


def test_a_deleted_conversation_comes_back_with_undo(window: MainWindow, loop, qtbot) -> None:
    window.reply_settings.max_tokens.setValue(4)
    _run_reply(loop, window, "Keep this one")
    conversation = window.chat_controller.conversation
    messages, finishes = window.store.messages(conversation), window.store.finishes(conversation)
    window.history.refresh()
    window.history.list.setCurrentRow(0)
    qtbot.mouseClick(next(b for b in window.history.findChildren(type(window.send_button)) if b.text() == "Delete"),
                     Qt.MouseButton.LeftButton)
    assert window.store.search() == [] and window.chat.texts() == []  # at once
    assert window.notice.text() == "Deleted “Keep this one”." and window.undo_button.isVisible()
    qtbot.mouseClick(window.undo_button, Qt.MouseButton.LeftButton)
    assert [c.id for c in window.store.search()] == [conversation] and window.history.list.count() == 1
    assert window.store.messages(conversation) == messages and window.store.finishes(conversation) == finishes
    assert window.chat_controller.conversation == conversation and window.chat.texts()[0] == "Keep this one"
    assert finishes[-1] == "length" and window.chat.toPlainText().rstrip().endswith(FINISH_NOTES["length"])
    assert not window.undo_button.isVisible()


def test_export_is_offered_in_the_documents_folder_under_the_title(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    conversation = store.create("Tuples: what/why?", first_message="hi")
    documents = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation))
    assert export_path(store, conversation) == documents / "Tuples what why.md"
    store.close()


def test_the_status_bar_names_the_model_and_gives_this_replys_figures(window: MainWindow, loop) -> None:
    folder = Path(window.model_name)
    assert window.model_label == folder.name and window.windowTitle() == f"ExpertSwap · {folder.name}"
    window.reply_settings.max_tokens.setValue(8)
    _run_reply(loop, window, "First question")
    status = window.statusBar().currentMessage()
    assert status.startswith(folder.name) and "hit rate 100% this reply" in status  # 100%: every expert resident
    assert "tok/s" in status and "first token" in status
    window.budget.policy.setCurrentText("substitute")
    status = window.statusBar().currentMessage()
    assert "substitute" in status and "tok/s" in status  # the reply's pace stays after a policy change
    window.budget.policy.setCurrentText("exact")
    _run_reply(loop, window, "Second question")
    assert "prompt tokens from the cache" in window.statusBar().currentMessage()


def test_model_names_read_as_their_names() -> None:
    assert model_label(DEFAULT_MODEL).startswith("built-in model")
    snapshot = "/home/u/.cache/huggingface/hub/models--allenai--OLMoE-1B-7B-0924/snapshots/0a1b2c"
    assert model_label(snapshot) == "allenai/OLMoE-1B-7B-0924"
    assert model_label("/models/Qwen3-30B-A3B") == "Qwen3-30B-A3B"


def test_the_budget_panel_explains_its_controls_and_says_whether_the_model_fits(window: MainWindow) -> None:
    panel = window.budget
    assert panel.slider.toolTip() and panel.follow.toolTip()
    for index in range(panel.policy.count()):
        name = panel.policy.itemText(index)
        assert name in POLICIES and panel.policy.itemData(index, Qt.ItemDataRole.ToolTipRole) == POLICY_TIPS[name]
    window._show_memory(MemorySample(rss_bytes=3 * 2**30, available_ram_bytes=20 * 2**30, cuda_allocated_bytes=0,
                                     cuda_reserved_bytes=0, cuda_free_bytes=0, budget_bytes=2**30,
                                     resident_expert_bytes=2**29))
    assert panel.fit.text() == "App 3.00 GiB · experts 512.0 MiB of 1.00 GiB · 20.00 GiB RAM free"
    sample = window.session.engine.watcher.sample()  # the engine's own: what following free memory would set
    assert 0 < sample.follow_bytes <= window.session.engine.total_expert_bytes
    window._show_memory(sample)
    assert panel.follow.text() == f"Follow free memory (would set {format_bytes(sample.follow_bytes)})"
    panel.follow.setChecked(True)
    window._show_memory(sample)
    assert panel.follow.text() == f"Follow free memory (budget {format_bytes(sample.follow_bytes)})"
    QApplication.processEvents()


def _code_blocks(view) -> list:
    from PySide6.QtGui import QTextFormat

    blocks, block = [], view.document().begin()
    while block.isValid():
        if block.blockFormat().hasProperty(QTextFormat.Property.BlockCodeLanguage):
            blocks.append(block)
        block = block.next()
    return blocks


def test_code_blocks_are_shaded_labelled_and_copied_and_typed_line_breaks_stay(qtbot) -> None:
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QPalette, QTextFormat

    from expertswap.app.chat_view import ChatView

    view = ChatView()
    qtbot.addWidget(view)
    view.add_message("user", "first line\nsecond line")
    view.begin_reply()
    view.append_chunk("Like this:\n\n```python\nx = 1\ny = (x,)\n```\n\nor\n\n```\nplain\n```")
    view.end_reply()
    lines = view.toPlainText().splitlines()
    assert lines[1:3] == ["first line", "second line"]  # not joined into one
    assert "python  Copy" in lines and "code  Copy" in lines
    shade = view.palette().color(QPalette.ColorRole.AlternateBase)
    block = view.document().begin()
    shaded = []
    while block.isValid():
        if block.blockFormat().hasProperty(QTextFormat.Property.BlockCodeLanguage):
            shaded.append((block.text(), block.blockFormat().background().color() == shade))
        block = block.next()
    assert shaded == [("x = 1", True), ("y = (x,)", True), ("plain", True)]
    view.anchorClicked.emit(QUrl("copy:0"))  # what clicking "Copy" above the first block sends
    assert QApplication.clipboard().text() == "x = 1\ny = (x,)"
    QApplication.clipboard().setText("unchanged")
    view.anchorClicked.emit(QUrl("https://example.com/"))  # a link in a message stays inert
    assert QApplication.clipboard().text() == "unchanged"
    assert view.texts()[-1].startswith("Like this:\n\n```python")  # the source, as the model wrote it
    from expertswap.app.theme import dark_palette

    view.setPalette(dark_palette())  # a theme change: the shade follows, the code stays readable on it
    qtbot.waitUntil(lambda: view.document().findBlockByLineNumber(0).isValid() and all(
        b.blockFormat().background().color() == dark_palette().color(QPalette.ColorRole.AlternateBase)
        for b in _code_blocks(view)))


def test_the_expert_map_numbers_its_layers_and_experts_and_flashes_only_what_comes_in(qtbot) -> None:
    from types import SimpleNamespace

    from expertswap.app.expert_map import LEFT, TOP, ExpertMap

    view = ExpertMap()
    qtbot.addWidget(view)
    view.resize(420, 200)
    view.show_residency(SimpleNamespace(resident={3: [0, 1], 4: [2]}, importance={3: [1.0] * 32, 4: [1.0] * 32},
                                        capacity={}, routed={3: [0] * 32, 4: [0] * 32}, last_token={3: [], 4: []}))
    assert view.cell_at(LEFT - 1, TOP + 1) is None and view.cell_at(LEFT + 1, TOP + 1) == (3, 0)
    assert view.cell_at(view.width() - 1, view.height() - 1) == (4, 31)
    image = view.grab().toImage()
    base = view.palette().base().color().rgb()
    margin = [image.pixel(x, y) for x in range(LEFT - 4) for y in range(TOP, view.height())]
    header = [image.pixel(x, y) for x in range(LEFT, view.width()) for y in range(TOP - 2)]
    assert any(p != base for p in margin) and any(p != base for p in header)  # L3, L4 and 0, 4, 8, ... drawn
    view.flash_swaps([SimpleNamespace(layer=3, expert_in=5, expert_out=1)])
    assert set(view.flashes) == {(3, 5)}


def test_loading_counts_its_seconds_keeps_send_off_and_the_build_shows_an_estimate_and_cancels(
        qtbot, loop, tmp_path: Path, monkeypatch) -> None:
    import expertswap.app.session as session_module

    def slow_build(model: str, progress) -> Path:
        for n in range(3000):  # a build that reports as the real one does, until it is cancelled
            progress("reading GGUF", n, 3000)
            time.sleep(0.01)
        raise AssertionError("the build was never cancelled")

    monkeypatch.setattr(session_module, "resolve_model", slow_build)
    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda _parent, _title, text: warnings.append(text))
    window = make_window(qtbot, tmp_path)
    window.show()

    async def drive() -> bool:
        task = window.spawn(window.load_model(DEFAULT_MODEL))
        while not (warnings or (window._progress is not None and "s left" in window._progress.labelText())):
            await asyncio.sleep(0.02)  # until the build has reported for a second
        assert not warnings
        assert window.statusBar().currentMessage().startswith("Loading built-in model")
        assert window.loading_bar.isVisible() and not window.send_button.isEnabled()
        window.prompt.setPlainText("hello")
        window.send()
        assert window.prompt.toPlainText() == "hello" and "still loading" in window.statusBar().currentMessage()
        cancel = next(b for b in window._progress.findChildren(QPushButton) if b.text() == "Cancel")
        qtbot.mouseClick(cancel, Qt.MouseButton.LeftButton)
        return await task

    assert loop.run_until_complete(asyncio.wait_for(drive(), 30)) is False
    assert "build was cancelled" in window.notice.text() and window._progress is None
    assert window.send_button.isEnabled() and not window.loading_bar.isVisible() and not warnings  # no error box


def test_view_offers_light_dark_or_the_systems_and_remembers_it(qtbot, tmp_path: Path) -> None:
    from PySide6.QtGui import QPalette

    window = make_window(qtbot, tmp_path)
    window.show()
    view = next(a.menu() for a in window.menuBar().actions() if a.text() == "&View")
    assert [a.text() for a in view.actions()] == ["Follow the &system", "&Light", "&Dark"]
    assert window.theme_actions["system"].isChecked()  # the default

    def window_lightness() -> int:
        return QApplication.palette().color(QPalette.ColorRole.Window).lightness()

    light, light_legend = window_lightness(), window.legend.text()
    window.theme_actions["dark"].trigger()
    assert window_lightness() < 100 < light
    qtbot.waitUntil(lambda: window.map.palette().color(QPalette.ColorRole.Base).lightness() < 100)  # the panels too
    dark_accent = QApplication.palette().color(QPalette.ColorRole.Highlight).name()
    assert f"color:{dark_accent}" not in light_legend
    qtbot.waitUntil(lambda: f"color:{dark_accent}" in window.legend.text())  # the map's key in the map's colours
    window.close()
    again = make_window(qtbot, tmp_path)
    assert again.theme == "dark" and again.theme_actions["dark"].isChecked() and window_lightness() < 100
    again.theme_actions["light"].trigger()
    assert window_lightness() == light
    again.theme_actions["system"].trigger()  # offscreen there is no system scheme: light
    assert window_lightness() == light


def test_the_app_can_show_that_it_is_starting_before_torch_is_imported() -> None:
    """torch and transformers take seconds to import (more from a cold disk): the entry point imports neither, so
    its splash shows first."""
    import subprocess
    import sys

    code = ("import sys, expertswap.app.main; "
            "print(sorted(m for m in ('torch', 'transformers', 'expertswap.engine') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"
