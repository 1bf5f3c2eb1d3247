"""Picking each next token of one reply from the model's logits.

The model's own log-probabilities are read first (what OpenAI's ``logprobs`` report); then the repetition
penalty (CTRL's rule, over the last ``REPEAT_WINDOW`` tokens, prompt included), OpenAI's presence and frequency
penalties (over the reply's tokens), the logit bias and a grammar's mask shape the logits, and greedy or top-k and
nucleus sampling picks from what is left.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expertswap.protocol.sampling import REPEAT_WINDOW, SamplingSettings

if TYPE_CHECKING:
    from expertswap.engine.decode.grammar import Grammar

MIN_TEMPERATURE = 1e-4  # below it the logits over the temperature overflow: as good as greedy, and finite


@dataclass(frozen=True)
class TokenLogprob:
    """A picked token's log-probability under the model, and the likeliest tokens' (id, log-probability)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """The picks of one reply: its settings, its random stream, the tokens it penalises and its grammar."""

    def __init__(self, settings: SamplingSettings, history: Sequence[int], grammar: Grammar | None = None,
                 logprobs: list[TokenLogprob] | None = None) -> None:
        self.settings, self.grammar = settings, grammar
        self.generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self.recent = collections.deque(history[-REPEAT_WINDOW:], maxlen=REPEAT_WINDOW)
        self.counts: collections.Counter[int] = collections.Counter()  # the reply's own tokens
        self.logprobs = logprobs  # appended to, one per pick, when the settings ask for them
        self._bias: torch.Tensor | None = None

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits; it is then counted, and fed to the grammar."""
        raw = logits.float()
        scores = self._shaped(raw)
        if self.settings.temperature <= 0:
            token = int(scores.argmax())
        else:
            if 0 < self.settings.top_k < scores.shape[-1]:
                floor = scores.topk(self.settings.top_k).values[-1]
                scores = scores.masked_fill(scores < floor, float("-inf"))
            probs = torch.softmax(scores / max(self.settings.temperature, MIN_TEMPERATURE), dim=-1)
            if self.settings.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < self.settings.top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
            token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
        if self.settings.logprobs is not None and self.logprobs is not None:
            self.logprobs.append(_logprob(raw, token, self.settings.logprobs))
        self.recent.append(token)
        self.counts[token] += 1
        if self.grammar is not None:
            self.grammar.accept(token)
        return token

    def _shaped(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the pick reads: penalised, biased, masked (a copy wherever one of them applies)."""
        settings = self.settings
        if settings.repetition_penalty != 1.0 and self.recent:
            seen = torch.tensor(sorted(set(self.recent)), device=logits.device)
            scores, penalty = logits[seen], settings.repetition_penalty
            logits = logits.index_copy(0, seen, torch.where(scores > 0, scores / penalty, scores * penalty))
        if (settings.presence_penalty or settings.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.index_add(0, ids, -(counts * settings.frequency_penalty + settings.presence_penalty))
        if settings.logit_bias:
            logits = logits + self._bias_row(logits)
        if self.grammar is not None:
            logits = self.grammar.masked(logits)
        return logits

    def _bias_row(self, logits: torch.Tensor) -> torch.Tensor:
        """OpenAI's ``logit_bias`` as a row to add; ids past the vocabulary are refused before the reply starts."""
        if self._bias is None:
            bias = torch.zeros_like(logits)
            for token, value in self.settings.logit_bias:
                bias[token] += value
            self._bias = bias
        return self._bias


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under the model's own distribution, and the ``top`` likeliest tokens'."""
    logprobs = torch.log_softmax(logits, dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(float(logprobs[token]), alternatives)
