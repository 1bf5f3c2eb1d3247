"""The KV caches of recent conversations, so that a chat's next turn runs only the tokens that are new.

A reply leaves its cache holding its prompt and every token it fed back. The next turn's prompt usually
starts with all of them (the history, then the new message), so the longest common prefix of token ids
is kept and only the rest runs. An edit, a regenerate or a new system prompt share less and recompute
from where they differ; a history cut to the context shares almost nothing and recomputes it all.

The live cache holds the last conversation. A few more wait parked in host memory at their size: a
server's clients take turns, and chat front ends ask for a title between two turns of one chat.

The kept keys and values were computed by the same model from the same tokens; only their grouping into
forwards differs (a decode step, a prefill), so they match a fresh prefill to rounding. Under a policy whose
output depends on what is resident (substitute, cpu, lowbit) a budget change drops them all, and so does
any policy change (``Runtime.output_key``); while a trace is recorded nothing is reused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from expertswap.engine.decode.session import Session, Sessions

PARKED = 3  # conversations kept beside the live one
PARKED_BYTES = 512 * 2**20  # host memory they may hold together


@dataclass
class _Kept:
    session: Session
    ids: list[int]  # the tokens whose keys and values the session's cache holds, in order


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Prefixes:
    """The live conversation's session and a few parked ones; every session a reply or a score runs on comes
    from here, so none is overwritten unparked (CUDA graphs share one cache)."""

    def __init__(self, sessions: Sessions, output_key: Callable[[], Hashable]) -> None:
        self.sessions = sessions
        self.output_key = output_key
        self.live: _Kept | None = None
        self.parked: list[_Kept] = []  # oldest first
        self._key: Hashable = None

    def session(self, ids: Sequence[int], capacity: int) -> tuple[Session, int]:
        """A session for ``capacity`` positions whose cache already holds the longest prefix of ``ids`` that an
        earlier turn left (all but the last id at most: its logits are the reply's start), and that prefix's
        length.

        A kept conversation that shares at least half its tokens moves on with this reply (a next turn, an edit
        or a regenerate); one that only starts alike (a system prompt, a title asked about a chat) stays as it
        was, and the reply starts from a copy of what they share.
        """
        key = self.output_key()
        if key != self._key or key is None:
            self.clear()
            self._key = key
        if key is None:
            return self.sessions.new(capacity), 0
        best, shared = None, 0
        for kept in ([self.live] if self.live else []) + self.parked:
            common = min(common_prefix(kept.ids, ids), len(ids) - 1)
            if common > shared:
                best, shared = kept, common
        if best is not None and 2 * shared >= len(best.ids):
            if best is self.live:
                self.live = None
            else:
                self.parked.remove(best)  # before the live one is parked: parking may drop the oldest
                self._park_live()
            if best.session.keep(shared):  # False: a sliding window that dropped the past
                best.session.resume(capacity)
                return best.session, shared
            return self.sessions.new(capacity), 0
        self._park_live()
        if best is not None and (copy := best.session.fork(capacity, shared)) is not None:
            return copy, shared
        return self.sessions.new(capacity), 0

    def fresh(self, capacity: int) -> Session:
        """An empty session (a score, logits), the live conversation parked first."""
        self._park_live()
        return self.sessions.new(capacity)

    def done(self, session: Session, fed: Sequence[int]) -> None:
        """After a reply: ``fed`` are the ids run through ``session`` in order (the prompt, then the reply's tokens);
        its cache holds the first ``length()`` of them."""
        self.live = _Kept(session, list(fed[: session.length()]))

    def forget_live(self) -> None:
        """A reply that failed: its cache may hold a step half done."""
        self.live = None

    def clear(self) -> None:
        self.live, self.parked = None, []

    def _park_live(self) -> None:
        if self.live is None:
            return
        live, self.live = self.live, None
        live.session.park()
        self.parked.append(live)
        while len(self.parked) > PARKED or sum(k.session.nbytes() for k in self.parked) > PARKED_BYTES:
            self.parked.pop(0)
