"""A conversation cut to the model's context: what the CLI's chat and the app send once a chat grows long.

Older turns go first, each whole (a user message with the replies that follow it), so the model never
reads an answer without its question; the system prompt and the message being answered always stay.
No torch here: it only counts what ``encode_chat`` gives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from expertswap.protocol.errors import PromptError

Message = dict[str, str]


@dataclass(frozen=True)
class FittedHistory:
    """What to send: the messages kept, their token ids (chat template applied) and how many turns were left out."""

    messages: list[Message]
    ids: list[int]
    dropped: int


RESERVE_CAP = 1024  # the most a history leaves free for the reply: a 4,096-token cap must not cost half the context


def fit_history(messages: Sequence[Message], encode_chat: Callable[[Sequence[Message]], list[int]],
                context: int | None, reserve: int) -> FittedHistory:
    """The fewest oldest turns dropped so that the prompt leaves ``reserve`` (at most ``RESERVE_CAP``) of
    ``context`` tokens for the reply.

    When even the system prompt and the last turn leave less room, every older turn is dropped and the
    reply gets what is left: the engine stops it at the context (``reply_limit`` says where).
    """
    reserve = min(reserve, RESERVE_CAP)
    system = [m for m in messages if m["role"] == "system"]
    turns: list[list[Message]] = []
    for message in (m for m in messages if m["role"] != "system"):
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)

    def keep(dropped: int) -> list[Message]:
        return system + [m for turn in turns[dropped:] for m in turn]

    @functools.cache
    def encoded(dropped: int) -> list[int]:
        return encode_chat(keep(dropped))

    def fits(dropped: int) -> bool:
        return context is None or len(encoded(dropped)) + reserve <= context

    last = max(len(turns) - 1, 0)  # the last turn is the one being answered: it always stays
    if last == 0 or fits(0):  # the usual case: one encoding
        return FittedHistory(keep(0), encoded(0), 0)
    low, high = 1, last  # tokens only fall as turns go: the fewest drops that fit by bisection, else all older turns
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return FittedHistory(keep(low), encoded(low), low)


def reply_limit(prompt_tokens: int, context: int | None, wanted: int) -> int:
    """New tokens a reply may have: ``wanted``, or what the context has left after the prompt (the rule the engine
    and the server apply), so that a front end can say why a reply ended.

    Raises ``PromptError`` when the prompt alone fills the context (the engine's own words), before anything runs.
    """
    if context is None:
        return wanted
    if prompt_tokens >= context:
        raise PromptError(f"the prompt has {prompt_tokens} tokens; this model's context holds {context}")
    return min(wanted, context - prompt_tokens)


def dropped_notice(dropped: int, context: int | None) -> str:
    """The one line both front ends show when turns were left out, e.g. for the CLI's stderr."""
    turns = "oldest turn" if dropped == 1 else f"{dropped} oldest turns"
    return f"dropped the {turns} to fit the {context}-token context"
