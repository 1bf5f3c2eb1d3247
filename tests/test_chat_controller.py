"""The chat's state machine without Qt: a real SQLite store, a fake transcript, frame and engine session.

The fake session streams one piece per turn of the event loop and can run an action at the n-th piece,
so every mid-reply case (stop, new chat, switching, deleting, closing) lands at a known point.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from expertswap.app.chat_controller import TITLE_CHARS, ChatController, Message
from expertswap.app.conversations import ConversationStore
from expertswap.protocol import SamplingSettings


class FakeTranscript:
    """What the chat view shows, as (role, text) pairs."""

    def __init__(self) -> None:
        self.shown: list[tuple[str, str]] = []
        self.notes: list[str] = []  # each message's finish, as marked

    def clear(self) -> None:
        self.shown, self.notes = [], []

    def add_message(self, role: str, text: str, finish: str = "") -> None:
        self.shown.append((role, text))
        self.notes.append(finish)

    def begin_reply(self) -> None:
        self.add_message("assistant", "")

    def append_chunk(self, text: str) -> None:
        role, before = self.shown[-1]
        self.shown[-1] = (role, before + text)

    def end_reply(self, finish: str = "") -> None:
        self.notes[-1] = finish

    def texts(self) -> list[str]:
        return [text for _, text in self.shown]


@dataclass
class FakeFrame:
    notices: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    replying: list[tuple[bool, bool]] = field(default_factory=list)
    refreshed: int = 0

    def notify(self, text: str) -> None:
        self.notices.append(text)

    def show_status(self, text: str) -> None:
        self.statuses.append(text)

    def show_replying(self, here: bool, anywhere: bool, empty: bool) -> None:
        self.replying.append((here, anywhere))
        self.empty = empty

    def conversations_changed(self) -> None:
        self.refreshed += 1


class FakeReplier:
    """Replies ``r<reply>-<n> `` pieces, up to ``max_new_tokens``; ``at[n]`` runs once, right after the n-th piece."""

    def __init__(self) -> None:
        self.ready = True
        self.controller: ChatController | None = None
        self.contexts: list[list[Message]] = []
        self.at: dict[int, Callable[[], object]] = {}
        self.failure = ""  # the words a failing reply ends with
        self.stops = 0
        self._stopping = False

    async def reply(self, messages: Sequence[Message], settings: SamplingSettings) -> str:
        assert self.controller is not None
        self.contexts.append(list(messages))
        self._stopping = False
        if self.failure:
            return self.failure
        for n in range(1, settings.max_new_tokens + 1):
            if self._stopping:
                return "stopped"
            self.controller.add_chunk(f"r{len(self.contexts)}-{n} ")
            if (action := self.at.pop(n, None)) is not None:
                action()
            await asyncio.sleep(0)
        return "stopped" if self._stopping else "done"

    def stop(self) -> None:
        self.stops += 1
        self._stopping = True


def pieces(reply: int, count: int) -> str:
    return "".join(f"r{reply}-{n} " for n in range(1, count + 1))


@dataclass
class Chat:
    controller: ChatController
    replier: FakeReplier
    transcript: FakeTranscript
    frame: FakeFrame
    store: ConversationStore
    path: Path

    def rows(self) -> list[tuple[int, str, str]]:
        """Every stored message, read from the file as another program would."""
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            return db.execute("SELECT conversation, role, content FROM messages ORDER BY id").fetchall()

    def send(self, text: str, tokens: int = 4, system: str = "") -> bool:
        return self.controller.send(text, system, SamplingSettings(max_new_tokens=tokens))

    async def settle(self) -> None:
        while self.controller.replying or (self.controller.reply_task is not None
                                           and not self.controller.reply_task.done()):
            await asyncio.sleep(0)

    def assert_stored_equals_shown(self) -> None:
        c = self.controller
        assert c.messages == ([] if c.conversation is None else self.store.messages(c.conversation))
        assert self.transcript.shown == [(m["role"], m["content"]) for m in c.messages]


def spawn(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.ensure_future(coroutine)


@pytest.fixture
def chat(tmp_path: Path) -> Iterator[Chat]:
    path = tmp_path / "conversations.sqlite3"
    store = ConversationStore(path)
    replier, transcript, frame = FakeReplier(), FakeTranscript(), FakeFrame()
    controller = ChatController(store, replier, transcript, frame, spawn)
    replier.controller = controller
    yield Chat(controller, replier, transcript, frame, store, path)
    store.close()


def run(chat: Chat, *steps: Callable[[], object]) -> None:
    """Run each step, then let the replies it started end, on one event loop."""

    async def scenario() -> None:
        for step in steps:
            step()
            await chat.settle()

    asyncio.run(scenario())


def test_a_reply_streams_onto_the_screen_and_into_its_conversation(chat: Chat) -> None:
    seen: list[object] = []
    chat.replier.at[2] = lambda: seen.extend([chat.transcript.texts(), chat.controller.replying,
                                              chat.frame.replying[-1], chat.rows(), chat.frame.refreshed])
    question = "Hello there, " + "x" * 60
    run(chat, lambda: chat.send(question, tokens=4, system="Be brief."))
    first = chat.store.search()[0]
    # the new chat is listed as it is created, not when its reply ends
    assert seen == [[question, pieces(1, 2)], True, (True, True), [(first.id, "user", question)], 1]
    assert chat.rows() == [(first.id, "user", question), (first.id, "assistant", pieces(1, 4))]
    assert (first.title, first.system) == (question[:TITLE_CHARS], "Be brief.")
    assert chat.replier.contexts == [[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": question}]]
    assert chat.transcript.texts() == [question, pieces(1, 4)]
    assert not chat.controller.replying and chat.frame.replying[-1] == (False, False) and chat.frame.refreshed == 2
    assert not chat.frame.empty
    chat.assert_stored_equals_shown()


def test_nothing_is_sent_without_words_or_without_a_model(chat: Chat) -> None:
    assert not chat.send("   \n")
    chat.replier.ready = False
    assert not chat.send("hello")
    assert chat.frame.statuses == ["Load a model first (Model menu)"]
    assert chat.rows() == [] and chat.transcript.shown == [] and chat.controller.reply_task is None


def test_a_second_message_to_the_streaming_chat_is_refused(chat: Chat) -> None:
    taken: list[bool] = []
    chat.replier.at[2] = lambda: taken.append(chat.send("again"))
    run(chat, lambda: chat.send("first", tokens=5))
    assert taken == [False]
    assert [(role, text) for _, role, text in chat.rows()] == [("user", "first"), ("assistant", pieces(1, 5))]


def test_stop_ends_the_reply_and_keeps_what_arrived(chat: Chat) -> None:
    chat.replier.at[3] = chat.controller.stop
    run(chat, lambda: chat.send("tell me everything", tokens=100))
    assert [(role, text) for _, role, text in chat.rows()] == [("user", "tell me everything"),
                                                               ("assistant", pieces(1, 3))]
    assert chat.frame.notices[-1] == ""  # stopping is not a failure
    chat.assert_stored_equals_shown()


def test_new_chat_mid_reply_keeps_the_partial_reply_and_the_next_message_waits_for_it(chat: Chat) -> None:
    at_send: list[object] = []

    def new_chat_and_send() -> None:
        chat.controller.new_chat()
        assert chat.controller.conversation is None and chat.transcript.shown == []
        assert chat.send("next one")
        at_send.extend([len(chat.frame.replying), chat.rows()[-1][1:]])

    chat.replier.at[3] = new_chat_and_send
    run(chat, lambda: chat.send("first", tokens=80))
    first, second = sorted(c.id for c in chat.store.search())
    mark, last_row = at_send
    assert last_row == ("user", "first")  # the message is stored once the stopping reply has ended...
    assert chat.frame.replying[mark] == (True, True)  # ...and meanwhile Send is off and Stop on
    assert chat.rows() == [(first, "user", "first"), (first, "assistant", pieces(1, 3)),
                           (second, "user", "next one"), (second, "assistant", pieces(2, 4))]
    assert chat.replier.contexts[-1] == [{"role": "user", "content": "next one"}]  # nothing leaked in
    assert chat.controller.conversation == second
    chat.assert_stored_equals_shown()


def test_deleting_the_conversation_mid_reply_leaves_nothing_behind(chat: Chat) -> None:
    chat.replier.at[3] = lambda: chat.controller.delete(chat.controller.conversation or -1)
    run(chat, lambda: chat.send("doomed", tokens=80))
    assert chat.rows() == [] and chat.store.search() == [] and chat.replier.stops >= 1
    assert chat.controller.conversation is None and chat.transcript.shown == []
    chat.assert_stored_equals_shown()


def test_switching_conversations_mid_reply_shows_each_as_stored(chat: Chat) -> None:
    run(chat, lambda: chat.send("one"), chat.controller.new_chat)
    one = chat.store.search()[0].id
    chat.replier.at[3] = lambda: chat.controller.open(one)
    run(chat, lambda: chat.send("two", tokens=80))
    two = next(c.id for c in chat.store.search() if c.id != one)
    assert chat.controller.conversation == one
    assert chat.transcript.texts() == ["one", pieces(1, 4)]  # no piece of the other reply leaked onto it
    chat.assert_stored_equals_shown()
    run(chat, lambda: chat.controller.open(two))
    assert chat.transcript.texts() == ["two", pieces(2, 3)]
    chat.assert_stored_equals_shown()


def test_closing_mid_reply_saves_the_partial_reply_and_nothing_after(chat: Chat) -> None:
    def close_then_send() -> None:
        chat.controller.new_chat()
        chat.send("never stored")  # waits for the stopping reply...
        chat.controller.close()  # ...and the window closes meanwhile

    chat.replier.at[3] = close_then_send
    run(chat, lambda: chat.send("closing", tokens=80))
    (conversation,) = chat.store.search()
    assert chat.rows() == [(conversation.id, "user", "closing"), (conversation.id, "assistant", pieces(1, 3))]
    assert chat.replier.stops >= 1 and chat.frame.refreshed == 1  # as it was created; nothing after the close
    chat.controller.add_chunk("late ")  # the engine's last word after closing goes nowhere
    assert chat.rows()[-1][2] == pieces(1, 3)


def test_a_failed_reply_says_why_stores_no_empty_reply_and_can_be_answered_again(chat: Chat) -> None:
    chat.replier.failure = "ModelFormatError: the model has no chat template"
    run(chat, lambda: chat.send("will it work?"))
    assert chat.frame.notices[-1] == "The reply failed: ModelFormatError: the model has no chat template"
    assert [(role, text) for _, role, text in chat.rows()] == [("user", "will it work?")]
    chat.assert_stored_equals_shown()
    chat.replier.failure = ""
    run(chat, lambda: chat.controller.regenerate(SamplingSettings(max_new_tokens=2)))
    assert [(role, text) for _, role, text in chat.rows()] == [("user", "will it work?"), ("assistant", pieces(2, 2))]
    assert chat.frame.notices[-1] == ""
    chat.assert_stored_equals_shown()


def test_regenerate_edit_and_the_last_reply(chat: Chat) -> None:
    assert chat.controller.last_reply() is None and chat.controller.edit_last() is None
    run(chat, lambda: chat.send("One", tokens=2), lambda: chat.send("Two", tokens=2),
        lambda: chat.controller.regenerate(SamplingSettings(max_new_tokens=3)))
    assert [(role, text) for _, role, text in chat.rows()] == [
        ("user", "One"), ("assistant", pieces(1, 2)), ("user", "Two"), ("assistant", pieces(3, 3))]
    assert chat.replier.contexts[-1][-1] == {"role": "user", "content": "Two"}  # the old reply is not read again
    assert chat.controller.last_reply() == pieces(3, 3)
    assert chat.controller.edit_last() == "Two"
    assert [(role, text) for _, role, text in chat.rows()] == [("user", "One"), ("assistant", pieces(1, 2))]
    chat.assert_stored_equals_shown()


def test_regenerate_and_edit_wait_until_the_reply_has_ended(chat: Chat) -> None:
    refused: list[object] = []

    def meddle() -> None:
        chat.controller.regenerate(SamplingSettings(max_new_tokens=2))
        refused.append(chat.controller.edit_last())

    chat.replier.at[2] = meddle
    run(chat, lambda: chat.send("steady", tokens=5))
    assert refused == [None] and len(chat.replier.contexts) == 1
    assert [(role, text) for _, role, text in chat.rows()] == [("user", "steady"), ("assistant", pieces(1, 5))]
    chat.assert_stored_equals_shown()


def test_the_dropped_turns_notice_says_the_chat_keeps_them_until_the_next_reply(chat: Chat) -> None:
    chat.replier.at[1] = lambda: chat.controller.trimmed("dropped the 2 oldest turns to fit the 1024-token context")
    run(chat, lambda: chat.send("long chat", tokens=2))
    assert chat.frame.notices[-1] == ("Dropped the 2 oldest turns to fit the 1024-token context: the model no longer "
                                      "reads them, this conversation keeps them.")
    run(chat, lambda: chat.send("and now", tokens=2))
    assert chat.frame.notices[-1] == ""
