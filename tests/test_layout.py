"""The layers hold at run time: the engine loads no Qt, the protocol and the client no torch (lint-imports: code)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # a subprocess or a long replay: make test runs it, make test-fast does not
def test_importing_engine_models_cli_and_server_loads_no_qt() -> None:
    code = ("import sys, expertswap.engine, expertswap.models, expertswap.cli, expertswap.server.app; "
            "print(sorted(m for m in sys.modules if 'PySide' in m or m.startswith(('expertswap.app', 'tools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_protocol_and_the_client_load_no_torch_and_no_transformers() -> None:
    """A remote app, or a script that drives a server, starts without the engine's heavy imports."""
    code = ("import sys, expertswap.protocol, expertswap.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith('expertswap.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
