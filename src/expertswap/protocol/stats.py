"""What an engine reports about itself: the one record the CLI, the app, the server and the client read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Everything the CLI and GUI report, read in one consistent go."""

    budget_bytes: int
    total_expert_bytes: int
    minimum_budget_bytes: int
    resident_expert_bytes: int
    peak_resident_expert_bytes: int
    expert_loads: int
    bytes_loaded: int
    hits: int
    misses: int
    skipped: int
    substituted: int
    cpu_computed: int
    low_precision: int
    background_swaps: int
    tokens_generated: int
    tokens_per_s: float
    time_to_first_token_s: float
    prompt_tokens: int  # the latest reply's prompt
    cached_prompt_tokens: int  # of them, those an earlier turn's cache held: not run again
    peak_rss_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0
