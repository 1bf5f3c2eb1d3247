"""``expertswap serve``: the engine behind an OpenAI-compatible HTTP API (a front end, like the app and the CLI)."""

from .app import create_app
from .background import BackgroundServer

__all__ = ["BackgroundServer", "create_app"]
