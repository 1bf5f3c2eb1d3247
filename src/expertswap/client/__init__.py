"""Front ends' client of OpenAI-compatible servers (no Qt): the app chats with a remote engine through it."""

from .remote import RemoteChunk, RemoteEngine, RemoteError, api_root

__all__ = ["RemoteChunk", "RemoteEngine", "RemoteError", "api_root"]
