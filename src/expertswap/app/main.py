"""``expertswap``: the desktop app. Shows that it is starting within a second (a splash, before torch is imported:
that alone takes seconds, more from a cold disk), then opens the window and loads the model in the background."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from importlib.resources import files

from PySide6.QtCore import Qt
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import QApplication, QSplashScreen

from expertswap import __version__
from expertswap.protocol import DEFAULT_BUDGET_RULE, DEFAULT_MODEL, default_budget


def main(argv: list[str] | None = None) -> int:
    import qasync

    parser = argparse.ArgumentParser(prog="expertswap", description="Chat with MoE models on small machines.")
    parser.add_argument(
        "--model", help=f'model folder, or "{DEFAULT_MODEL}" (the built-in model); default: the last one'
    )
    parser.add_argument("--budget", help='starting expert budget ("50%", "300MiB"); default: the last one, or '
                        f"the model's own ({DEFAULT_BUDGET_RULE})".replace("%", "%%"))
    parser.add_argument("--device", choices=["cpu", "cuda"], help="where experts run; default: a GPU if there is one")
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="offscreen: load the default model, stream a short reply, move the budget; exit 0 if all works",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args, qt_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.self_test:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication([sys.argv[0], *qt_args])
    app.setApplicationName("ExpertSwap")
    app.setWindowIcon(QIcon(str(files("expertswap.app") / "icons" / "expertswap.png")))
    app.setStyle("Fusion")  # Fusion takes the platform's light or dark palette the same way on every OS
    splash = None
    if not args.self_test:
        splash = QSplashScreen(QPixmap(str(files("expertswap.app") / "icons" / "expertswap.png")).scaledToWidth(256))
        splash.show()
        splash.showMessage("Starting ExpertSwap…", int(Qt.AlignmentFlag.AlignBottom | Qt.AlignmentFlag.AlignHCenter))
        app.processEvents()
    from .main_window import MainWindow  # torch and transformers come in here

    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    if args.self_test:
        from .self_test import run

        with loop:
            # a windowed Windows build has no stdout: the exit status still tells
            return loop.run_until_complete(run(lambda line: sys.stdout and print(line, flush=True)))
    window = MainWindow()
    if args.device:
        window.session.device = args.device
    window.show()
    if splash is not None:
        splash.finish(window)
    model = args.model or str(window.state.value("model", DEFAULT_MODEL))
    budget = args.budget or str(window.state.value("budget", default_budget(model)))
    # the loop outlives the window until its tasks (a reply stopped by closing, a load) have unwound:
    # qasync runs leftover callbacks without a running loop once Qt's loop has quit
    app.setQuitOnLastWindowClosed(False)
    closed = asyncio.Event()
    window.closed.connect(closed.set)

    async def lifetime() -> None:
        window.spawn(window.load_model(model, budget))
        await closed.wait()
        await window.settled()

    with loop:
        loop.run_until_complete(lifetime())
    return 0


if __name__ == "__main__":
    sys.exit(main())
