"""Light or dark, or as the system says: one palette for the whole app, which every panel paints from.

Fusion takes the platform's dark palette only where a platform theme reports one (not under X11 without a
desktop, nor offscreen), so the dark palette is set here, the same on every OS.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

THEMES = ("system", "light", "dark")


def dark_palette() -> QPalette:
    palette = QPalette()
    roles = QPalette.ColorRole
    for role, color in ((roles.Window, "#2b2b2b"), (roles.WindowText, "#e6e6e6"), (roles.Base, "#1f1f1f"),
                        (roles.AlternateBase, "#333333"), (roles.Text, "#e6e6e6"), (roles.Button, "#353535"),
                        (roles.ButtonText, "#e6e6e6"), (roles.Highlight, "#3d8ee6"), (roles.HighlightedText, "#ffffff"),
                        (roles.ToolTipBase, "#3a3a3a"), (roles.ToolTipText, "#e6e6e6"), (roles.Link, "#6fb1ff"),
                        (roles.PlaceholderText, "#9a9a9a"), (roles.BrightText, "#ff6b6b")):
        palette.setColor(role, QColor(color))
    for role in (roles.WindowText, roles.Text, roles.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#7a7a7a"))
    return palette


def is_dark(theme: str) -> bool:
    """Whether ``theme`` ("system", "light", "dark") paints dark now."""
    return theme == "dark" or (theme == "system" and
                               QGuiApplication.styleHints().colorScheme() == Qt.ColorScheme.Dark)


def apply(theme: str) -> None:
    """The app's palette for ``theme``."""
    app = QApplication.instance()
    assert isinstance(app, QApplication)
    style = app.style()
    app.setPalette(dark_palette() if is_dark(theme) else style.standardPalette())
