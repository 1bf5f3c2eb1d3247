"""``expertswap``: the desktop app. Opens the window at once and loads the default model in the background."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from PySide6.QtWidgets import QApplication


def main(argv: list[str] | None = None) -> int:
    import qasync

    from .main_window import MainWindow

    parser = argparse.ArgumentParser(prog="expertswap", description="Chat with MoE models on small machines.")
    parser.add_argument("--model", help='model folder, or "default" (the built-in model); default: the last one')
    parser.add_argument("--budget", help='starting expert budget ("50%%", "300MiB"); default: the last one, or 50%%')
    args, qt_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app = QApplication.instance() or QApplication([sys.argv[0], *qt_args])
    app.setApplicationName("ExpertSwap")
    app.setStyle("Fusion")  # Fusion takes the platform's light or dark palette the same way on every OS
    window = MainWindow()
    window.show()
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    closed = asyncio.Event()
    app.aboutToQuit.connect(closed.set)
    model = args.model or str(window.state.value("model", "default"))
    budget = args.budget or str(window.state.value("budget", "50%"))
    with loop:
        loop.create_task(window.load_model(model, budget))
        loop.run_until_complete(closed.wait())
    return 0


if __name__ == "__main__":
    sys.exit(main())
