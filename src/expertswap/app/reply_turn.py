"""One assistant reply, bound to the conversation it answers, saving itself there as it grows.

The window may move to another conversation, start a new one or delete this one while the reply
streams; the turn keeps writing to its own conversation (or nowhere, once that is deleted), so no
reply leaks into another chat and a crash loses at most the last ``FLUSH_S`` of its tokens.
"""

from __future__ import annotations

import time

from .conversations import FINISH_NOTES, ConversationStore

FLUSH_S = 0.5


class ReplyTurn:
    """The growing text of one reply and the stored row that mirrors it."""

    def __init__(self, store: ConversationStore, conversation: int) -> None:
        self.store = store
        self.conversation = conversation
        self.text = ""
        self.message_id: int | None = None
        self.closed = False
        self._flushed_at = time.monotonic()

    def add(self, chunk: str) -> None:
        self.text += chunk
        if time.monotonic() - self._flushed_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the text so far: the first flush adds the assistant's row, later ones rewrite it."""
        self._flushed_at = time.monotonic()
        if self.closed or not self.text:
            return
        if self.message_id is None:
            self.message_id = self.store.add(self.conversation, "assistant", self.text)
            if self.message_id is None:  # the conversation was deleted meanwhile
                self.closed = True
        else:
            self.store.update(self.message_id, self.text)

    def finish(self, how: str = "") -> None:
        """Final write, with how the reply ended if it did not end by itself (``FINISH_NOTES``); later calls (a
        reply ending after the window closed) do nothing."""
        self.flush()
        if how in FINISH_NOTES and self.message_id is not None and not self.closed:
            self.store.set_finish(self.message_id, how)
        self.closed = True

    def discard(self) -> None:
        """Its conversation is being deleted: write nothing more."""
        self.closed = True
