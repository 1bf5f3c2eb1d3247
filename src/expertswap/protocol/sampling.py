"""How the next token is picked: the settings every front end sends and the engine checks once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from expertswap.protocol.errors import SettingsError

REPEAT_WINDOW = 64  # the tokens a repetition penalty looks back over (llama.cpp's repeat_last_n)
MAX_TOP_LOGPROBS = 20  # alternatives a token's log-probabilities may list (OpenAI's limit)
MAX_BIAS = 100.0  # a logit bias lies in [-100, 100], as OpenAI's


@dataclass(frozen=True)
class Constraint:
    """What the reply must be, enforced token by token (constrained decoding): the sampler masks every token the
    grammar forbids, so the reply always parses.

    ``json``: any JSON object; ``json_schema``: JSON matching the schema in ``text`` (itself JSON); ``lark``: text
    matching the grammar in ``text`` (llguidance's Lark dialect, which may embed ``%json {...}`` schemas)."""

    kind: Literal["json", "json_schema", "lark"]
    text: str = ""


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is picked; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # above 0: only the k likeliest tokens are sampled from (0: all)
    seed: int | None = None
    repetition_penalty: float = 1.0  # above 1: the last ``REPEAT_WINDOW`` tokens' logits are pushed down (CTRL's rule)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token the reply already holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the reply holds the token
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's ``logit_bias``
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and its k likeliest rivals
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        """Refuse settings that would crash or silently misbehave mid-reply (nan, top_p 0, no tokens)."""
        if not _whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise SettingsError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _whole(self.top_k) or self.top_k < 0:
            raise SettingsError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SettingsError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _whole(self.seed):
            raise SettingsError(f"seed must be a whole number, got {self.seed!r}")
        self._check_openai_fields()

    def _check_openai_fields(self) -> None:
        """The penalties, bias and log-probabilities within OpenAI's ranges."""
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _number(value) or not -2.0 <= value <= 2.0:
                raise SettingsError(f"{name} must be a number in [-2, 2], got {value!r}")
        for token, bias in self.logit_bias:
            if not _whole(token) or token < 0 or not _number(bias) or abs(bias) > MAX_BIAS:
                raise SettingsError(f"logit_bias takes token ids >= 0 with biases in [-100, 100], got {token!r}: "
                                    f"{bias!r}")
        if self.logprobs is not None and (not _whole(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise SettingsError(f"logprobs must be a whole number in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the model's logits, untouched: what a step may pick on the device, ahead of the host."""
        return (self.temperature <= 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.logprobs is None
                and self.constraint is None)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


CHAT_SAMPLING = SamplingSettings(max_new_tokens=4096, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
"""Where a chat starts (the app, ``chat``): sampled and lightly penalised against loops, which greedy decoding of a
small model falls into; up to 4,096 new tokens, the context ending a reply sooner."""
