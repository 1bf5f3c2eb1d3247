"""How the next token is picked: the settings every front end sends and the engine checks once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertswap.protocol.errors import SettingsError


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
