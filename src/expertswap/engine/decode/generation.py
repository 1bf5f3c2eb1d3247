"""A compact decoding loop (prefill, then one token at a time on a KV cache) that can be stopped."""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from expertswap.protocol.sampling import REPEAT_WINDOW, SamplingSettings

if TYPE_CHECKING:
    from expertswap.engine.decode.session import Session
    from expertswap.engine.decode.step import StepGuard


def pick_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None,
               recent: Sequence[int] = ()) -> int:
    """Greedy, or temperature + nucleus sampling, from one row of logits; the ``recent`` tokens penalised first
    (a positive logit divided by the penalty, a negative one multiplied)."""
    if settings.repetition_penalty != 1.0 and recent:
        seen = torch.tensor(sorted(set(recent)), device=logits.device)
        scores = logits[seen].float()
        penalty = settings.repetition_penalty
        logits = logits.float().index_copy(0, seen, torch.where(scores > 0, scores / penalty, scores * penalty))
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < settings.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def decode_loop(
    session: Session,
    input_ids: list[int],
    settings: SamplingSettings,
    stop_ids: set[int],
    cancel: threading.Event,
    guard: StepGuard,
    before: Sequence[int] = (),
) -> Generator[int, None, None]:
    """Yield new token ids: a prefill of ``input_ids`` (after ``before``, already in the cache), then one token at
    a time on the session's cache, each through ``guard``; greedy tokens one step ahead where the session can
    (``_greedy_ahead``)."""
    generator = None
    if settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed)
    recent = collections.deque([*before[-REPEAT_WINDOW:], *input_ids[-REPEAT_WINDOW:]], maxlen=REPEAT_WINDOW)
    plain_greedy = settings.temperature <= 0 and settings.repetition_penalty == 1.0
    tokens = input_ids
    for step in range(settings.max_new_tokens):
        if cancel.is_set():
            return
        if step == 1 and plain_greedy and session.runs_ahead():
            yield from _greedy_ahead(session, tokens[0], settings.max_new_tokens - 1, stop_ids, cancel, guard)
            return
        logits = guard.run(functools.partial(session.run, tokens), is_prefill=step == 0, session=session)
        token = pick_token(logits[-1], settings, generator, recent)
        recent.append(token)
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
