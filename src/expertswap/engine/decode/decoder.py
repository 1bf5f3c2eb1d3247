"""Turning token ids into logits, scores and replies: one reply at a time, every forward through the step guard.

Async callers get tokens from a worker thread of the decoder's own, handed to their event loop as
they come; cancelling stops the reply after its current token. A reply starts from the cache an earlier
turn left where its prompt begins with that turn's tokens (``prefixes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from expertswap.engine.decode.generation import IncrementalDecoder, decode_loop
from expertswap.engine.decode.grammar import Grammar, GrammarCompiler
from expertswap.engine.decode.prefixes import Prefixes
from expertswap.engine.decode.sampler import Sampler, TokenLogprob
from expertswap.engine.decode.step import StepGuard
from expertswap.protocol.errors import EngineBusyError, EngineClosedError, PromptError, SettingsError
from expertswap.protocol.sampling import SamplingSettings


@dataclass(frozen=True)
class TokenScores:
    """Per scored token: its negative log-likelihood and the model's top-1 prediction for it."""

    nll: torch.Tensor
    top1: torch.Tensor


@dataclass(frozen=True)
class TokenChunk:
    """One generated token, the text it completed (empty while a character is still partial), and its
    log-probability when the settings asked for them."""

    token_id: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class ReplyStats:
    """The latest reply's pace, and how much of its prompt an earlier turn's cache held."""

    tokens: int = 0
    tokens_per_s: float = 0.0
    time_to_first_token_s: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    finish: str = ""  # "stop": the model ended it; "length": the token limit or the context; "cancelled"


class ReplyListener(Protocol):
    """Who hears of a reply's progress (the engine's ``Reporter``: telemetry, the peak, the swapper's wake-up)."""

    def token_done(self, pace: ReplyStats) -> None:
        """After each token, with the reply's pace so far."""

    def reply_edge(self) -> None:
        """As a reply starts and again as it ends (a memory sample at each end of a short reply)."""

    def chunk_scored(self) -> None:
        """Between the chunks ``score`` runs, as a chat's swapper would run between its tokens."""


class Decoder:
    """Runs the model for the engine: one reply or score at a time, every forward through ``guard``."""

    def __init__(self, prefixes: Prefixes, guard: StepGuard, stop_ids: set[int], listener: ReplyListener,
                 vocab: int, grammars: GrammarCompiler | None) -> None:
        self.vocab, self.grammars = vocab, grammars
        self.prefixes = prefixes
        self.sessions = prefixes.sessions
        self.guard = guard
        self.stop_ids = stop_ids
        self.listener = listener
        self.last = ReplyStats()
        self.closed = False  # close() gave the model's memory back: nothing runs any more
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertswap-generate")

    def logits(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Logits for every position of ``input_ids`` (one forward, misses loaded exactly), on the CPU."""
        with self._exclusive():  # sessions may share one persistent cache (CUDA graphs)
            session = self.prefixes.fresh(len(input_ids))
            return self.guard.run(lambda: session.run(input_ids, all_logits=True), is_prefill=True,
                                  session=session).float().cpu()

    def score(self, input_ids: Sequence[int], chunk: int, prompt: int) -> TokenScores:
        """Loss and top-1 of each token after the first: a prefill of ``prompt`` tokens, then ``chunk`` at a time."""
        ids = list(input_ids)
        with self._exclusive():
            session = self.prefixes.fresh(len(ids))
            pieces = [ids[:prompt]] + [ids[i : i + chunk] for i in range(prompt, len(ids), chunk)]
            predictors: list[torch.Tensor] = []
            last: torch.Tensor | None = None
            for n, piece in enumerate(pieces):
                logits = self.guard.run(functools.partial(session.run, piece, all_logits=True), is_prefill=n == 0,
                                        session=session).float().cpu()
                predictors.append(logits[:-1] if last is None else torch.cat([last[None], logits[:-1]]))
                last = logits[-1]
                self.listener.chunk_scored()
            scored = torch.cat(predictors)
            targets = torch.tensor(ids[1:], dtype=torch.long)
            return TokenScores(torch.nn.functional.cross_entropy(scored, targets, reduction="none"), scored.argmax(-1))

    def generate(self, input_ids: Sequence[int], settings: SamplingSettings,
                 cancel: threading.Event | None = None,
                 logprobs: list[TokenLogprob] | None = None) -> Iterator[int]:
        """Yield new token ids (synchronously) until EOS, ``max_new_tokens`` or cancellation; each token's
        log-probability goes to ``logprobs`` as it is picked, when the settings ask for them."""
        if not input_ids:
            raise PromptError("the prompt is empty: there is nothing to reply to")
        self._check_bias(settings)
        limit = self.sessions.context
        if limit is not None and len(input_ids) >= limit:
            raise PromptError(f"the prompt has {len(input_ids)} tokens; this model's context holds {limit}")
        if limit is not None and len(input_ids) + settings.max_new_tokens > limit:  # the reply stops at the context
            settings = dataclasses.replace(settings, max_new_tokens=limit - len(input_ids))
        with self._exclusive():
            cancel = cancel or self._cancel
            cancel.clear()
            start = time.perf_counter()
            first = start
            count = 0
            fed = list(input_ids)  # every id run through the session, in order: the prompt, then the reply's
            sampler = Sampler(settings, fed, self._grammar(settings), logprobs)  # a bad grammar: nothing is lost
            self.listener.reply_edge()
            try:
                session, cached = self.prefixes.session(fed, len(fed) + settings.max_new_tokens)
                self.last = ReplyStats(prompt_tokens=len(input_ids), cached_prompt_tokens=cached)
                reply = decode_loop(session, fed[cached:], sampler, settings.max_new_tokens, self.stop_ids, cancel,
                                    self.guard)
                with contextlib.closing(reply):  # its steps queued ahead are taken back before the cache is kept
                    for token in reply:
                        now = time.perf_counter()
                        if count == 0:
                            first = now
                        count += 1
                        pace = (count - 1) / (now - first) if count > 1 and now > first else 0.0
                        self.last = ReplyStats(count, pace, first - start, len(input_ids), cached)
                        self.listener.token_done(self.last)
                        fed.append(token)
                        yield token
                self.prefixes.done(session, fed)
                ended = "stop" if count and fed[-1] in self.stop_ids else "cancelled" if cancel.is_set() else "length"
                self.last = dataclasses.replace(self.last, finish=ended)
            except GeneratorExit:  # the caller stopped reading: the cache holds what was fed
                self.prefixes.done(session, fed)
                self.last = dataclasses.replace(self.last, finish="cancelled")
                raise
            except BaseException:
                self.prefixes.forget_live()
                raise
            finally:
                self.listener.reply_edge()

    async def stream_ids(self, input_ids: Sequence[int], settings: SamplingSettings,
                         text: IncrementalDecoder) -> AsyncGenerator[TokenChunk, None]:
        """Run generation on the decoder's worker thread and hand tokens to the event loop as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        picks: list[TokenLogprob] = []

        def work() -> None:
            try:
                for token in self.generate(input_ids, settings, cancel, picks):
                    chunk = TokenChunk(token, text.push(token), picks[-1] if picks else None)
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        self._cancel = cancel
        future = loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancel.set()
            await future  # work() never raises; a plain await also unwinds when the app's loop is quitting

    def check(self, settings: SamplingSettings) -> None:
        """What ``generate`` would refuse of ``settings`` (a bias past the vocabulary, a grammar llguidance
        cannot use), found before a reply starts: a server answers it with a 400, not a broken stream."""
        self._check_bias(settings)
        self._grammar(settings)

    def _check_bias(self, settings: SamplingSettings) -> None:
        if any(token >= self.vocab for token, _bias in settings.logit_bias):
            raise SettingsError(f"logit_bias names a token past this model's vocabulary of {self.vocab}")

    def _grammar(self, settings: SamplingSettings) -> Grammar | None:
        if settings.constraint is None:
            return None
        if self.grammars is None:
            raise SettingsError("constrained output needs the model's tokenizer, and this model has none")
        return self.grammars.compile(settings.constraint)

    def cancel(self) -> None:
        """Stop the reply in progress after its current token; safe from any thread."""
        self._cancel.set()

    def close(self) -> None:
        self.closed = True
        self.cancel()
        self._executor.shutdown(wait=True)
        self.prefixes.clear()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One reply or score at a time: a second caller is refused at once, never queued."""
        if self.closed:
            raise EngineClosedError("this engine is closed: load the model again")
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError("a reply is already being generated")
        try:
            yield
        finally:
            self._busy.release()
