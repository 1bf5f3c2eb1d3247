"""The chat's state machine, without Qt: sending, a reply streaming into its own conversation, stopping, new
chat, opening and deleting conversations while a reply streams, and closing mid-reply.

The invariant it keeps: the conversation on screen equals the one stored in SQLite. A reply belongs to the
conversation it answers (``ReplyTurn``), whatever the user opens, starts or deletes meanwhile; the engine
runs one reply at a time, so a message sent while another chat's reply is stopping waits for it. The window
gives it a transcript, a frame (notice, status, buttons, the list of conversations), a replier (the engine
session) and a way to spawn tasks; tests give it fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from expertswap.app.conversations import FINISH_NOTES, ConversationStore, Removed
from expertswap.app.reply_turn import ReplyTurn
from expertswap.protocol import SamplingSettings

TITLE_CHARS = 48
Message = dict[str, str]
Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]


class Transcript(Protocol):
    """The messages shown, the last one growing while a reply streams (the window's ``ChatView``)."""

    def clear(self) -> None: ...
    def add_message(self, role: str, text: str, finish: str = "") -> None: ...
    def begin_reply(self) -> None: ...
    def append_chunk(self, text: str) -> None: ...
    def end_reply(self, finish: str = "") -> None: ...
    def texts(self) -> list[str]: ...


class Frame(Protocol):
    """The window around the transcript."""

    def notify(self, text: str) -> None:
        """One-off news above the chat; "" clears it."""

    def show_status(self, text: str) -> None:
        """A line in the status bar."""

    def show_replying(self, here: bool, anywhere: bool, empty: bool) -> None:
        """Whether a reply streams in the chat on screen (Send off, Stop on) or anywhere (Regenerate, Edit off), and
        whether the chat on screen is empty (nothing to regenerate or edit)."""

    def conversations_changed(self) -> None:
        """A conversation was added, grew or went: refresh the list."""


class Replier(Protocol):
    """The engine behind the chat (the window's ``EngineSession``); its chunks come back through ``add_chunk``."""

    @property
    def ready(self) -> bool:
        """A model is loaded or a server connected."""

    async def reply(self, messages: Sequence[Message], settings: SamplingSettings) -> str:
        """Stream one reply; returns "done", "stopped" or the failure in words."""

    def stop(self) -> None: ...


class ChatController:
    """One chat on screen (``conversation``, ``messages``) and at most one reply in flight (``turn``)."""

    def __init__(self, store: ConversationStore, replier: Replier, transcript: Transcript, frame: Frame,
                 spawn: Spawn) -> None:
        self.store = store
        self.replier = replier
        self.transcript = transcript
        self.frame = frame
        self.spawn = spawn
        self.messages: list[Message] = []
        self.conversation: int | None = None  # None: a new chat, stored once its first message is sent
        self.turn: ReplyTurn | None = None
        self.reply_task: asyncio.Task[None] | None = None
        self._turn_in_view = False  # the transcript's last message is the streaming reply
        self._waiting = False  # a sent message waits for a stopping reply (the engine runs one at a time)
        self._closing = False

    @property
    def replying(self) -> bool:
        """A reply streams or is stopping, or a message waits for one to stop."""
        return self.turn is not None or self._waiting

    @property
    def replying_here(self) -> bool:
        """A reply to the conversation on screen is streaming (one for another chat may still be stopping)."""
        return self._waiting or (self.turn is not None and self.turn.conversation == self.conversation)

    # ---- the user's actions ------------------------------------------------------------------------------
    def send(self, text: str, system: str, settings: SamplingSettings) -> bool:
        """Send ``text`` (``system`` starts a new conversation); False when refused, so the input box keeps it."""
        text = text.strip()
        if not text:
            return False
        if not self.replier.ready:
            self.frame.show_status("Load a model first (Model menu)")
            return False
        if self.replying_here:
            return False
        self.reply_task = self.spawn(self._send(text, system, settings, self.reply_task))
        return True

    def regenerate(self, settings: SamplingSettings) -> None:
        """Answer the last message again: drops the last reply, or answers a message left without one."""
        if self.replying or not self.replier.ready or not self.messages:
            return
        if self.messages[-1]["role"] == "assistant":
            self._truncate(len(self.messages) - 1)
        self.reply_task = self.spawn(self._answer(settings))

    def edit_last(self) -> str | None:
        """Forget the last message and its reply; returns its text for the input box (None: nothing to edit)."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if self.replying or not users:
            return None
        text = self.messages[users[-1]]["content"]
        self._truncate(users[-1])
        return text

    def last_reply(self) -> str | None:
        replies = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return replies[-1] if replies else None

    def stop(self) -> None:
        """Stop the reply in progress (Stop, Esc); it ends as "stopped" and keeps what arrived."""
        self.replier.stop()

    def new_chat(self) -> None:
        """An empty chat at once; a reply in progress stops and is kept in its own conversation."""
        if self.replying:
            self.replier.stop()
        self.conversation = None
        self.messages = []
        self._render()
        self._show_replying()

    def open(self, conversation: int) -> None:
        """Show a stored conversation; a reply in progress stops and is kept in its own conversation."""
        if conversation == self.conversation or not self.store.exists(conversation):
            return
        if self.replying:
            self.replier.stop()
        self.conversation = conversation
        self.messages = self.store.messages(conversation)
        self._render()
        self._show_replying()

    def delete(self, conversation: int) -> Removed | None:
        """Delete a conversation; a reply to it stops and nothing more of it is written. Returns its rows, for
        Undo (``ConversationStore.restore``)."""
        if self.turn is not None and self.turn.conversation == conversation:
            self.turn.discard()
            self.replier.stop()
        removed = self.store.delete(conversation)
        if conversation == self.conversation:
            self.new_chat()
        self.frame.conversations_changed()
        return removed

    def close(self) -> None:
        """The window closes: save the reply in progress as it stands and stop it; nothing is written after."""
        self._closing = True
        if self.turn is not None:
            self.turn.finish("stopped")
        self.replier.stop()

    # ---- what the replier reports ------------------------------------------------------------------------
    def add_chunk(self, text: str) -> None:
        """A piece of the reply: into its turn, and onto the screen while its conversation is shown."""
        if self.turn is None:
            return
        self.turn.add(text)
        if self._turn_in_view and self.conversation == self.turn.conversation:
            self.transcript.append_chunk(text)

    def trimmed(self, notice: str) -> None:
        """Only what the model reads was cut (``notice``: which oldest turns): the chat keeps every turn."""
        self.frame.notify(f"{notice.capitalize()}: the model no longer reads them, this conversation keeps them.")

    # ---- the reply ---------------------------------------------------------------------------------------
    async def _send(self, text: str, system: str, settings: SamplingSettings,
                    previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():  # a reply to another chat is still stopping
            self._waiting = True
            self._show_replying()
            await asyncio.wait([previous])
            self._waiting = False
        if self._closing:
            return
        if self.conversation is None:
            self.conversation = self.store.create(text[:TITLE_CHARS], system, first_message=text)
            self.frame.conversations_changed()  # listed at once, not when its reply ends
        else:
            self.store.add(self.conversation, "user", text)
        self.messages.append({"role": "user", "content": text})
        self.transcript.add_message("user", text)
        await self._answer(settings)

    async def _answer(self, settings: SamplingSettings) -> None:
        """Stream the assistant's answer; the turn stores it in its own conversation, even when stopped."""
        assert self.conversation is not None
        turn = self.turn = ReplyTurn(self.store, self.conversation)
        system = self.store.get(turn.conversation).system
        context = ([{"role": "system", "content": system}] if system else []) + list(self.messages)
        self.transcript.begin_reply()
        self._turn_in_view = True
        self.frame.notify("")
        self._show_replying()
        outcome = ""
        try:
            outcome = await self.replier.reply(context, settings)
        finally:
            turn.finish(outcome)
            self.turn = None
            if self._turn_in_view:
                self.transcript.end_reply(outcome if outcome in FINISH_NOTES else "")
        if self._closing:
            return
        if outcome not in ("done", *FINISH_NOTES):
            self.frame.notify(f"The reply failed: {outcome}")
        if self.conversation == turn.conversation:  # the screen shows exactly what was stored
            self.messages = self.store.messages(turn.conversation)
            if self.transcript.texts() != [m["content"] for m in self.messages] or not self._turn_in_view:
                self._render()
        self._turn_in_view = False
        self._show_replying()
        self.frame.conversations_changed()

    def _truncate(self, keep: int) -> None:
        del self.messages[keep:]
        if self.conversation is not None:
            self.store.truncate(self.conversation, keep)
        self._render()

    def _render(self) -> None:
        self._turn_in_view = False
        self.transcript.clear()
        finishes = self.store.finishes(self.conversation) if self.conversation is not None else []
        for n, message in enumerate(self.messages):
            self.transcript.add_message(message["role"], message["content"], finishes[n] if n < len(finishes) else "")
        self._show_replying()

    def _show_replying(self) -> None:
        self.frame.show_replying(self.replying_here, self.replying, not self.messages)
