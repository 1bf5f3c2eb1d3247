"""The desktop app's decode speed against the engine's alone (what `expertswap-cli` gets), on one model, in one run.

    python -m benchmarks app-speed [--model FOLDER] [--budgets 100% 50% 25%] [--tokens 192] [--repeats 5] --out DIR

The app must cost decoding nothing: its window paints the expert map, the swap log and the charts from the
engine's telemetry on the GUI thread, which shares the interpreter with the decoder. Each measurement is a
fresh process, the contenders round-robin: the engine alone as the CLI runs it (greedy, ``Engine.generate``, each
token's text decoded and written), and the real window
offscreen (Qt's ``offscreen`` platform) with the model loaded at the budget, the swap log showing, a prompt sent
through the window as a user would. Both read the reply's pace as the engine measures it (``stats()``: tokens
after the first over their time). The default model is a synthetic OLMoE whose misses swap every token below
100%, so the panels have work to do.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .stamp import stamp

PROMPT = "Write a long story about a dragon who learns to paint."


def synthetic_model() -> Path:
    """A synthetic OLMoE of 8 layers x 32 experts, top-4, built once into the temporary folder."""
    import torch

    from tools.synthetic import build_model

    folder = Path(tempfile.gettempdir()) / "expertswap-app-speed-olmoe-32x8"
    if not (folder / "config.json").exists():
        build_model("olmoe", folder, dtype=torch.float32, layers=8, num_experts=32, top_k=4, hidden=512,
                    intermediate=256, heads=8, kv_heads=8)
    return folder


def engine_alone(folder: str, budget: str, tokens: int) -> float:
    """tok/s of one greedy reply of ``tokens`` in this process, the engine alone as ``expertswap-cli`` runs it:
    ``generate`` on the main thread, each token's text decoded and written out."""
    from expertswap.engine import Engine, IncrementalDecoder
    from expertswap.protocol import SamplingSettings

    with Engine.load(folder, budget=budget) as engine, open(os.devnull, "w") as out:
        ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
        text = IncrementalDecoder(engine.tokenizer)
        for token in engine.generate(ids, SamplingSettings(max_new_tokens=tokens)):
            out.write(text.push(token))
            out.flush()
        return engine.stats().tokens_per_s


def in_the_window(folder: str, budget: str, tokens: int) -> float:
    """tok/s of one reply of ``tokens`` sent through the real window (offscreen), its swap log showing."""
    import asyncio

    import qasync
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from expertswap.app.conversations import ConversationStore
    from expertswap.app.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    with tempfile.TemporaryDirectory() as home:
        window = MainWindow(store=ConversationStore(Path(home) / "c.sqlite3"),
                            settings=QSettings(str(Path(home) / "s.ini"), QSettings.Format.IniFormat))
        window.resize(1400, 900)
        window.show()
        if not loop.run_until_complete(window.load_model(folder, budget=budget)):
            raise SystemExit(f"the window could not load {folder}")
        window.reply_settings.max_tokens.setValue(tokens)
        window.reply_settings.temperature.setValue(0.0)  # greedy, as the engine alone runs
        window.reply_settings.repetition.setValue(1.0)
        window.prompt.setPlainText(PROMPT)
        window.send()
        loop.run_until_complete(window.chat_controller.reply_task)
        speed = window.session.stats().tokens_per_s
        window.session.close()
        window.close()
    loop.close()
    return speed


def main(folder: Path | None, budgets: list[str], tokens: int, repeats: int, out: Path) -> Path:
    """Every budget, each contender in a fresh process ``repeats`` times round-robin; the table goes to ``out``."""
    model = str(folder or synthetic_model())
    speeds: dict[tuple[str, str], list[float]] = {}
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    for _ in range(repeats):
        for budget in budgets:
            for name in ("engine_alone", "in_the_window"):
                code = ("import json; from benchmarks.app_speed import " + name +
                        f"; print(json.dumps({name}({model!r}, {budget!r}, {tokens})))")
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                      check=True, timeout=900)
                speeds.setdefault((name, budget), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "app-speed-cpu.md"
    lines = [f"# The app's decode speed against the engine alone, {Path(model).name}", "",
             (f"{stamp()}. Greedy, {tokens} new tokens, medians of {repeats} fresh processes, round-robin. The window: "
              "offscreen, 1400 x 900, the swap log showing, the prompt sent through it; the engine alone: the CLI's "
              "loop (`generate`, each token's text decoded and written); tok/s as the engine measures the reply "
              "(`stats().tokens_per_s`). Written by `python -m benchmarks app-speed`."), "",
             "| budget | engine alone tok/s | in the window tok/s | window / alone |", "| --- | ---: | ---: | ---: |"]
    for budget in budgets:
        alone = statistics.median(speeds[("engine_alone", budget)])
        window = statistics.median(speeds[("in_the_window", budget)])
        lines.append(f"| {budget} | {alone:.1f} | {window:.1f} | {window / alone:.2f}x |")
    lines += ["", "Target (issue 31): the window at least 0.9x the engine alone at every budget."]
    path.write_text("\n".join(lines) + "\n")
    return path
