"""How the next token is picked: the settings every front end sends and the engine checks once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertswap.protocol.errors import SettingsError

REPEAT_WINDOW = 64  # the tokens a repetition penalty looks back over (llama.cpp's repeat_last_n)


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is picked; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # above 1: the last ``REPEAT_WINDOW`` tokens' logits are pushed down (CTRL's rule)

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
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SettingsError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not whole(self.seed):
            raise SettingsError(f"seed must be a whole number, got {self.seed!r}")


CHAT_SAMPLING = SamplingSettings(max_new_tokens=4096, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
"""Where a chat starts (the app, ``chat``): sampled and lightly penalised against loops, which greedy decoding of a
small model falls into; up to 4,096 new tokens, the context ending a reply sooner."""
