"""Shared fixtures: tiny random MoE checkpoints of every family, built once per test session."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

try:
    import expertswap.app  # noqa: F401  (before pytest-qt imports PySide6: takes back its import hook, see app/__init__.py)
except ModuleNotFoundError as missing:  # a GPU box running only the engine's CUDA tests has no Qt
    if missing.name != "PySide6":
        raise
from expertswap.engine import Engine
from tools.quantized_checkpoints import to_fp8, to_mxfp4
from tools.synthetic import FAMILY_NAMES, build_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

# DeepSeek keeps its first layer dense: give it three layers so two are MoE.
LAYERS = {"deepseek_v3": 3, "deepseek_v2": 3}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model(family)`` -> folder of a saved random model of that family (8 experts, top-2)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = build_model(family, folder, layers=LAYERS.get(family, 2))
        return built[family]

    return get


@pytest.fixture(scope="session")
def packed_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``packed_model(family)``: a model of that family saved as its hub quantised layout (MXFP4 for GPT-OSS,
    FP8 with 16x16 blocks for the others); float32 outside the packed experts, so that logits compare exactly."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = build_model(family, tmp_path_factory.mktemp(f"packed-{family}"),
                                 layers=LAYERS.get(family, 2))
            built[family] = to_mxfp4(folder) if family == "gpt_oss" else to_fp8(folder)
        return built[family]

    return get


@pytest.fixture(scope="session")
def reference() -> Callable[[Path], PreTrainedModel]:
    """Plain transformers loading of a folder: the ground truth the engine must reproduce."""
    cache: dict[Path, PreTrainedModel] = {}

    def get(folder: Path) -> PreTrainedModel:
        if folder not in cache:
            cache[folder] = AutoModelForCausalLM.from_pretrained(folder).eval()
        return cache[folder]

    return get


ALL_FAMILIES = FAMILY_NAMES


@pytest.fixture
def open_engine() -> Iterator[Callable[..., Engine]]:
    """``open_engine(folder, ...)``: ``Engine.load`` whose engines are closed when the test ends, pass or fail."""
    engines: list[Engine] = []

    def load(*args: object, **kwargs: object) -> Engine:
        engines.append(Engine.load(*args, **kwargs))
        return engines[-1]

    yield load
    for engine in engines:
        engine.close()


@pytest.fixture(autouse=True)
def qt_garbage_collected_on_the_gui_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Qt test's windows are collected here, on the GUI thread, before the next test starts an engine
    thread: collected there, a wrapper's C++ deletion deadlocked against the next window's paint event."""
    yield
    if "qtbot" in request.fixturenames:
        gc.collect()


@pytest.fixture(autouse=True)
def no_engine_thread_outlives_its_test() -> Iterator[None]:
    """Every engine a test opens is closed by its end: none of its threads (swapper, memory watcher,
    generation worker) may still run. A leak here would make later tests share a busy CPU and lock."""
    before = set(threading.enumerate())
    yield
    alive = [t.name for t in threading.enumerate() if t not in before and t.name.startswith("expertswap-")]
    assert not alive, f"engine threads still running after the test (close every engine it opened): {alive}"


@pytest.fixture
def loop(qapp):
    """qasync's loop on the test's QApplication; any error that reaches it fails the test."""
    import asyncio

    import qasync

    loop = qasync.QEventLoop(qapp)
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()  # joins the executor threads that asyncio.to_thread started
    asyncio.set_event_loop(None)
    assert not errors, f"errors reached the event loop: {errors}"


def make_window(qtbot, folder: Path, store=None):
    """A main window with its own settings and conversations in ``folder``."""
    from PySide6.QtCore import QSettings

    from expertswap.app.conversations import ConversationStore
    from expertswap.app.main_window import MainWindow

    settings = QSettings(str(folder / "state.ini"), QSettings.Format.IniFormat)
    win = MainWindow(store=store or ConversationStore(folder / "conversations.sqlite3"), settings=settings)
    qtbot.addWidget(win)
    win.reply_settings.temperature.setValue(0.0)  # greedy, so a test knows its reply (the app starts sampled)
    win.reply_settings.repetition.setValue(1.0)
    return win


@pytest.fixture
def window(qtbot, loop, tiny_model, tmp_path: Path):
    """A shown window with the tiny Qwen3-MoE model loaded at full budget."""
    win = make_window(qtbot, tmp_path)
    win.show()
    assert loop.run_until_complete(win.load_model(str(tiny_model("qwen3_moe")), budget="100%"))
    yield win
    win.session.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` run on the lent GPU; CI (no GPU) skips them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
