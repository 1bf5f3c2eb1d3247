"""A compact decoding loop (prefill, then one token at a time on a KV cache) that can be stopped."""

from __future__ import annotations

import functools
import threading
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from expertswap.engine.decode.sampler import Sampler
    from expertswap.engine.decode.session import Session
    from expertswap.engine.decode.step import StepGuard


def decode_loop(
    session: Session,
    input_ids: list[int],
    sampler: Sampler,
    max_new_tokens: int,
    stop_ids: set[int],
    cancel: threading.Event,
    guard: StepGuard,
) -> Generator[int, None, None]:
    """Yield new token ids: a prefill of ``input_ids`` (after what the cache holds), then one token at a time on
    the session's cache, each through ``guard`` and picked by ``sampler``; plain greedy tokens one step ahead
    where the session can (``_greedy_ahead``)."""
    tokens = input_ids
    for step in range(max_new_tokens):
        if cancel.is_set():
            return
        if step == 1 and sampler.settings.plain_greedy and session.runs_ahead():
            yield from _greedy_ahead(session, tokens[0], max_new_tokens - 1, stop_ids, cancel, guard)
            return
        logits = guard.run(functools.partial(session.run, tokens), is_prefill=step == 0, session=session)
        token = sampler.pick(logits[-1])
        yield token
        if token in stop_ids:
            return
        tokens = [token]


def _greedy_ahead(session: Session, token: int, count: int, stop_ids: set[int], cancel: threading.Event,
                  guard: StepGuard) -> Iterator[int]:
    """``count`` greedy tokens after ``token``, each step queued before the host reads the step before's pick:
    the GPU never waits for the host's bookkeeping between tokens. A step queued past the reply's end (after
    its stop token, or a cancel) is finished and taken back out of the cache; its lookups count in the stats."""
    queued = [(session.mark(), guard.ahead(functools.partial(session.ahead, token), session))]
    try:
        for left in range(count - 1, -1, -1):
            if left and not cancel.is_set():
                mark = session.mark()
                queued.append((mark, guard.ahead(functools.partial(session.ahead, None), session)))
            else:
                guard.finish()
            token = queued.pop(0)[1].token
            yield token
            if token in stop_ids or cancel.is_set():
                return
    finally:
        if queued:
            guard.finish()
            session.roll_back(queued[0][0])


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode  # type: ignore[attr-defined]
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        text = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]
