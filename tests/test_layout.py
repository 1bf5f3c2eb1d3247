"""The runtime loads no Qt: the GUI is a view over the engine's public API (import-linter checks the sources)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_engine_models_cli_and_server_loads_no_qt() -> None:
    code = ("import sys, expertswap.engine, expertswap.models, expertswap.cli, expertswap.server.app; "
            "print(sorted(m for m in sys.modules if 'PySide' in m or m.startswith(('expertswap.app', 'tools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
