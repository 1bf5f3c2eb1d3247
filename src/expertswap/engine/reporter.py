"""What a reply's progress tells the rest of the engine: per-token telemetry, the peak, the swapper's wake-up."""

from __future__ import annotations

import time
from collections.abc import Sequence

from expertswap.engine.budget.watcher import MemoryWatcher
from expertswap.engine.decode.decoder import ReplyStats
from expertswap.engine.moe.committee import Committee
from expertswap.engine.moe.residency import residency, resident_bytes
from expertswap.engine.moe.runtime import Runtime
from expertswap.engine.observe.counters import Totals, totals
from expertswap.protocol.events import TokenStats

EMIT_S = 0.1  # a listener hears a reply's stats and the committees at most this often, and at its first and last
# token: a snapshot of every layer on every token cost the decoder a fifth of its speed with the window open


class Reporter:
    """The decoder's listener: it owns the peak of resident bytes and emits each token's stats and residency."""

    def __init__(self, committees: Sequence[Committee], runtime: Runtime, watcher: MemoryWatcher) -> None:
        self.committees = committees
        self.runtime = runtime
        self.watcher = watcher
        self.peak_resident_bytes = resident_bytes(committees)
        self._first: Totals | None = None  # the counts at this reply's first token: its decode starts there
        self._emitted = 0.0  # when the last stats and snapshot went out
        self._pending: ReplyStats | None = None  # a token's stats held back, as the frame's went out already

    def counts(self) -> Totals:
        """Every count so far, in one device read."""
        return totals(self.runtime.counters, [c.routing for c in self.committees])

    def token_done(self, pace: ReplyStats) -> None:
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident_bytes(self.committees))
        self.runtime.swaps_due.set()
        telemetry = self.runtime.telemetry
        if not telemetry.active:  # nobody listens: skip the device sync and the snapshot
            return
        if pace.tokens > 1 and not telemetry.every_token and time.monotonic() - self._emitted < EMIT_S:
            self._pending = pace  # told with the next frame's, or as the reply ends
            return
        self._emit(pace)

    def _emit(self, pace: ReplyStats) -> None:
        """The reply's stats and the committees as they are, to every listener."""
        self._emitted, self._pending = time.monotonic(), None
        telemetry = self.runtime.telemetry
        counts = self.counts()
        if self._first is None:
            self._first = counts
        decoded = counts.hits - self._first.hits, counts.misses - self._first.misses
        hit_rate = decoded[0] / sum(decoded) if sum(decoded) else 1.0
        telemetry.emit(TokenStats(tokens=pace.tokens, tokens_per_s=pace.tokens_per_s, hit_rate=hit_rate,
                                  expert_loads=counts.loads, skipped=counts.skipped, substituted=counts.substituted,
                                  cpu_computed=counts.cpu_computed))
        with self.runtime.lock:
            telemetry.emit(residency(self.committees))

    def reply_edge(self) -> None:
        if self._pending is not None and self.runtime.telemetry.active:  # the reply's last token, not yet told
            self._emit(self._pending)
        self._first, self._pending = None, None
        self.watcher.publish()

    def chunk_scored(self) -> None:
        self.runtime.swaps_due.set()
