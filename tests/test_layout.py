"""The engine never imports Qt or the app: the GUI is a thin view over the engine's public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
FORBIDDEN = ("PySide6", "qasync", "expertswap.app", "app")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_engine_sources_import_no_qt() -> None:
    files = sorted(ENGINE.glob("*.py"))
    assert files
    for path in files:
        bad = {n for n in _imports(path) if n.split(".")[0] in FORBIDDEN or n.startswith("expertswap.app")}
        assert not bad, f"{path.name} imports {bad}"


def test_importing_engine_loads_no_qt() -> None:
    code = "import sys, expertswap.engine, expertswap.engine.cli; print(sorted(m for m in sys.modules if 'PySide' in m or m.startswith('expertswap.app')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
