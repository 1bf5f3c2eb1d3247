"""``expertswap --self-test``: what an installed build must manage once before it ships.

Offscreen, with throwaway settings and conversations (the user's are never touched): load the
default model, stream a short reply, move the budget slider to its minimum mid-reply, and check
that the engine ends at that budget with its experts inside it; serve it over the OpenAI API and
chat through that server as a remote engine (the HTTP stack is in the build); load nf4 experts.
Exit status 0 only if all held.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from PySide6.QtCore import QSettings

from expertswap.engine import Engine
from expertswap.models import DEFAULT_MODEL
from expertswap.protocol import DEFAULT_BUDGET

from .conversations import ConversationStore
from .main_window import MainWindow

PROMPT = "Hello! Who are you?"


async def run(report) -> int:
    """Drive a real window through the checks; ``report`` prints one line per step."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="expertswap-self-test-") as scratch:
        folder = Path(scratch)
        settings = QSettings(str(folder / "state.ini"), QSettings.Format.IniFormat)
        window = MainWindow(store=ConversationStore(folder / "conversations.sqlite3"), settings=settings)
        window.show()
        try:
            return await _checks(window, report, start)
        finally:
            window.close()


async def _checks(window: MainWindow, report, start: float) -> int:
    if not await window.load_model(DEFAULT_MODEL):
        report("FAIL: the default model did not load")
        return 1
    engine = window.session.engine
    assert isinstance(engine, Engine)
    report(f"loaded the default model in {time.perf_counter() - start:.1f} s "
           f"(budget {engine.budget_bytes} of {engine.total_expert_bytes} expert bytes)")
    chunks: list[str] = []
    finished: list[str] = []
    window.session.reply_chunk.connect(chunks.append)
    window.session.reply_finished.connect(finished.append)

    def budget_to_minimum_at_the_fourth_chunk(_chunk: str) -> None:
        if len(chunks) == 4:
            window.budget.slider.setValue(0)

    window.session.reply_chunk.connect(budget_to_minimum_at_the_fourth_chunk)
    window.reply_settings.max_tokens.setValue(24)
    window.prompt.setPlainText(PROMPT)
    window.send()
    deadline = time.monotonic() + 300
    while not finished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    reply = "".join(chunks).strip()
    report(f"reply ({finished[-1] if finished else 'no end signal'}): {reply!r}")
    deadline = time.monotonic() + 10
    while engine.budget_bytes != engine.minimum_budget_bytes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the slider's debounce, then the engine applies it
    resident = engine.resident_expert_bytes()
    report(f"budget moved to {engine.budget_bytes} bytes (minimum {engine.minimum_budget_bytes}); resident {resident}")
    remote_reply = await _served_and_remote(window, report)
    quantised = await window.load_model(DEFAULT_MODEL, DEFAULT_BUDGET, "nf4")  # bitsandbytes is in the build
    nf4 = window.session.engine
    report(f"nf4 experts: {'loaded' if quantised else 'did not load'}"
           + (f", {nf4.total_expert_bytes} expert bytes" if quantised and nf4 is not None else ""))
    failures = [text for ok, text in (
        (quantised and nf4 is not None and nf4.quantize == "nf4", "the default model did not load with nf4 experts"),
        (bool(reply), "the reply was empty"),
        (bool(remote_reply), "no reply through the app's own server"),
        (finished[-1:] in (["done"], ["length"]), f"the reply ended with {finished[-1:]}"),
        (engine.budget_bytes == engine.minimum_budget_bytes, "the budget slider did not reach the engine"),
        (resident <= engine.budget_bytes, "resident experts exceed the budget"),
    ) if not ok]
    for text in failures:
        report(f"FAIL: {text}")
    report("self-test passed" if not failures else "self-test FAILED")
    return 1 if failures else 0


async def _served_and_remote(window: MainWindow, report) -> str:
    """Model > Serve over the OpenAI API, then a second session connected to it: one reply through HTTP."""
    from .session import EngineSession

    window.serve_action.trigger()
    server = window.session.server
    if server is None:
        report("FAIL: the model could not be served")
        return ""
    client = EngineSession()
    try:
        if not await client.connect_server(server.url):
            return ""
        texts: list[str] = []
        client.reply_chunk.connect(texts.append)
        outcome = await client.reply([{"role": "user", "content": PROMPT}], window.reply_settings.sampling())
        report(f"served at {server.url}; a remote session's reply ({outcome}): {''.join(texts).strip()[:40]!r}")
        return "".join(texts).strip() if outcome in ("done", "length") else ""  # length: cut at its limit
    finally:
        client.close()
        window.serve_action.trigger()
