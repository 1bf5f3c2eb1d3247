"""Where bundled data lies: a PyInstaller build's unpacked folder, or the source checkout."""

from __future__ import annotations

import sys
from pathlib import Path


def resources_root() -> Path:
    """The ``resources/`` folder (icons, the default model's shipped files, in a build also its GGUF)."""
    frozen = getattr(sys, "_MEIPASS", None)
    return (Path(frozen) if frozen else Path(__file__).resolve().parents[1]) / "resources"
