"""A compact decoding loop (prefill, then one token at a time on a KV cache) that can be stopped."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import SettingsError

if TYPE_CHECKING:
    from .session import Session
    from .step import StepGuard

# every attention backend but cuDNN: it builds a new graph for each new sequence length, which cost
# about 30 ms per decode step on an H100 (torch 2.11), ten times the 2-layer step it served
_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.OVERRIDEABLE]


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """How every engine forward runs: inference mode, attention backends that suit a growing KV cache."""
    with torch.inference_mode(), sdpa_kernel(_ATTENTION):
        yield


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is picked; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refuse settings that would crash or silently misbehave mid-reply (nan, top_p 0, no tokens)."""
        def whole(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not number(self.temperature) or self.temperature < 0:
            raise SettingsError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not whole(self.seed):
            raise SettingsError(f"seed must be a whole number, got {self.seed!r}")


def pick_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> int:
    """Greedy, or temperature + nucleus sampling, from one row of logits."""
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
) -> Iterator[int]:
    """Yield new token ids: a prefill, then one token at a time on the session's cache, each through ``guard``."""
    generator = None
    if settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed)
    tokens = input_ids
    for step in range(settings.max_new_tokens):
        if cancel.is_set():
            return
        logits = guard.run(functools.partial(session.run, tokens), is_prefill=step == 0, session=session)
        token = pick_token(logits[-1], settings, generator)
        yield token
        if token in stop_ids:
            return
        tokens = [token]


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
