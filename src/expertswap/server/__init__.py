"""``expertswap serve``: the engine behind an OpenAI-compatible HTTP API (a front end, like the app and the CLI)."""

from .app import create_app
from .background import BackgroundServer
from .guard import MAX_BODY_BYTES, loopback

__all__ = ["MAX_BODY_BYTES", "BackgroundServer", "create_app", "loopback"]
