"""Replay routing traces through the engine's own residency code, at several budgets, against Belady's optimum.

``python -m benchmarks replay TRACE... [--budgets 25% 50% 75%] [--out DIR]``: a table and a plot per trace,
``replay-<trace>.md`` and ``.png``, in ``DIR`` only (by default a new temporary folder, so a run never
overwrites a committed result; ``--out benchmarks/results`` refreshes those). No weights are loaded: each MoE layer
gets the engine's ``ExpertCache`` (the bookkeeping the committee runs), sized by the engine's planner for
the trace's expert count and a nominal expert size, and is driven as an ``exact`` forward drives it:
observe the routing (the cache's own hit and miss counters), load what is missing pass by pass, and one
background-swapper round after each decode token by the engine's own rule: under ``exact`` the swapper only
fills empty slots (a miss loads itself), under the policies that never load while decoding (``substitute``,
``lowbit``, ``cpu``) it also evicts for a more important expert. Committees start as the engine's do (slot i
holds expert i, then the prompt loads what it routes to). Hit rates count decode tokens; prompt tokens are
reported apart; bytes moved are per decode token. Contenders:

- the engine's default (``exact``: importance eviction, the swapper filling empty slots), the same with the
  evicting swapper, and each other eviction it offers (``lru``, ``lfu``), on demand;
- a static committee: the N experts each layer routed to most in the first half, scored on the second;
- Belady's MIN, the offline optimum for demand loading (evict the expert needed again latest);
- the default with prefetch, from the trace's ``predicted`` experts (layer L+1's router on layer L's
  hidden state, the GPU step's predictor) or from co-activation (the experts this token chose in layer L
  name those it will choose in L+1, learned online from earlier tokens): the guesses are loaded before
  layer L+1 runs, and a prefetched expert counts as a hit, as it would if its copy arrived in time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertswap.engine import TraceHeader, TraceToken, read_trace
from expertswap.engine.budget.swapper import SWAPS_PER_LAYER
from expertswap.engine.moe.expert_cache import ExpertCache
from expertswap.engine.observe.trace import steps
from expertswap.protocol import DEFAULT_EVICTION, LayerShape, parse_budget, plan_capacities

from .stamp import stamp

NOMINAL = 1 << 20  # expert size when the trace does not give one: budgets are shares of it either way
CPU = torch.device("cpu")


@dataclass
class Tally:
    hits: int = 0
    misses: int = 0
    prompt_hits: int = 0
    prompt_misses: int = 0
    loads: int = 0
    decode_loads: int = 0  # of ``loads``, those made for decode tokens
    predicted: int = 0
    right: int = 0
    used: int = 0

    def load(self, decode: bool, count: int) -> None:
        self.loads += count
        self.decode_loads += count if decode else 0

    def count(self, decode: bool, hits: int, routed: int) -> None:
        if decode:
            self.hits, self.misses = self.hits + hits, self.misses + routed - hits
        else:
            self.prompt_hits, self.prompt_misses = self.prompt_hits + hits, self.prompt_misses + routed - hits

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 1.0

    @property
    def prompt_hit_rate(self) -> float:
        total = self.prompt_hits + self.prompt_misses
        return self.prompt_hits / total if total else 1.0


def capacities(header: TraceHeader, budget: str) -> list[int]:
    """Committee sizes from the engine's planner for ``budget`` of the trace's experts."""
    size = header.expert_bytes or NOMINAL
    shapes = [LayerShape(header.experts, header.top_k, size) for _ in header.layers]
    return plan_capacities(parse_budget(budget, size * header.experts * len(header.layers)), shapes)


def _routing(group: list[TraceToken], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([t.experts[layer] for t in group])
    weights = torch.tensor([t.weights.get(layer) or [1.0] * len(t.experts[layer]) for t in group])
    return index, weights


def _install(cache: ExpertCache, loads: list[tuple[int, int]]) -> int:
    for expert, slot in loads:
        cache.slots.install(slot, expert)
    cache.slots.publish()
    return len(loads)


class CoActivation:
    """Predicts layer L+1's experts from those a token chose in layer L, from counts of earlier tokens."""

    def __init__(self, layers: list[int], experts: int) -> None:
        self.counts = {layer: torch.zeros(experts, experts) for layer in layers[1:]}
        self.before = dict(zip(layers[1:], layers, strict=False))

    def predict(self, layer: int, chosen: list[int], k: int) -> list[int]:
        row = self.counts[layer][chosen].sum(0)
        return [int(e) for e in row.topk(k).indices if row[e] > 0]

    def learn(self, group: list[TraceToken]) -> None:
        for token in group:
            for layer, earlier in self.before.items():
                for a in token.experts[earlier]:
                    self.counts[layer][a, token.experts[layer]] += 1


def engine_replay(header: TraceHeader, tokens: list[TraceToken], caps: list[int], eviction: str,
                  swapper: bool = False, prefetch: str | None = None, evict: bool = False) -> Tally:
    """The engine's residency code on the trace: what the committees of an ``exact`` run would have done.

    ``swapper``: a background round after each decode token, filling empty slots, and with ``evict`` also
    evicting for a more important expert (the rule for the policies that never load while decoding)."""
    caches = {layer: ExpertCache(header.experts, header.top_k, cap, CPU, eviction)
              for layer, cap in zip(header.layers, caps, strict=True)}
    for cache in caches.values():
        _install(cache, list(zip(cache.first_residents(), range(cache.capacity), strict=True)))
    predictor = CoActivation(header.layers, header.experts) if prefetch == "co-activation" else None
    tally = Tally()
    for group in steps(tokens):
        decode = group[0].phase == "decode"
        for i, layer in enumerate(header.layers):
            cache = caches[layer]
            index, weights = _routing(group, layer)
            if prefetch and decode and i > 0:
                guess = (predictor.predict(layer, group[0].experts[header.layers[i - 1]], header.top_k)
                         if predictor is not None else group[0].predicted.get(layer, []))
                tally.load(decode, _install(cache, cache.loads(guess)))
                used = set(group[0].experts[layer])
                tally.predicted += len(guess)
                tally.right += len(used & set(guess))
                tally.used += len(used)
            hits, misses = int(cache.routing.hits), int(cache.routing.misses)
            cache.observe(index, weights)  # the cache's own counters decide what was a hit
            hits = int(cache.routing.hits) - hits
            tally.count(decode, hits, hits + int(cache.routing.misses) - misses)
            for part in cache.passes(cache.needed(index)):
                tally.load(decode, _install(cache, cache.loads(part)))
        if swapper and decode:
            for cache in caches.values():
                plan = cache.plan_swaps(SWAPS_PER_LAYER, evict=evict)
                tally.load(decode, _install(cache, [(expert, slot) for expert, slot, _ in plan]))
        if predictor is not None:
            predictor.learn(group)
    return tally


def belady(header: TraceHeader, tokens: list[TraceToken], caps: list[int]) -> Tally:
    """Belady's MIN per layer, demand loading only, from the engine's starting committee (experts 0..C-1)."""
    groups = list(steps(tokens))
    tally = Tally()
    for layer, cap in zip(header.layers, caps, strict=True):
        needs = [{e for t in g for e in t.experts[layer]} for g in groups]
        uses: dict[int, list[int]] = {}
        for s, need in enumerate(needs):
            for e in need:
                uses.setdefault(e, []).append(s)
        resident = set(range(cap))
        for s, group in enumerate(groups):
            routed = [e for t in group for e in t.experts[layer]]
            tally.count(group[0].phase == "decode", sum(e in resident for e in routed), len(routed))
            for e in sorted(needs[s] - resident):
                if len(resident) >= cap:
                    candidates = resident - needs[s]
                    if not candidates:  # more needed than slots (a long prompt): counted, not simulated
                        continue
                    resident.remove(max(candidates, key=lambda x: _next_use(uses.get(x, []), s, len(groups))))
                resident.add(e)
                tally.load(group[0].phase == "decode", 1)
    return tally


def _next_use(steps_used: list[int], now: int, never: int) -> int:
    return next((u for u in steps_used if u > now), never)


def static(header: TraceHeader, tokens: list[TraceToken], caps: list[int]) -> Tally:
    """The top-N experts per layer of the first half, pinned; hit rate over the second half's decode tokens."""
    half = len(tokens) // 2
    tally = Tally()
    for layer, cap in zip(header.layers, caps, strict=True):
        seen = Counter(e for t in tokens[:half] for e in t.experts[layer])
        pinned = {e for e, _ in seen.most_common(cap)}
        for t in tokens[half:]:
            tally.count(t.phase == "decode", sum(e in pinned for e in t.experts[layer]), len(t.experts[layer]))
    return tally


DEFAULT_ROW = f"engine default (exact: {DEFAULT_EVICTION}, swapper fills empty slots)"


def contenders() -> dict[str, Callable[[TraceHeader, list[TraceToken], list[int]], Tally]]:
    default = DEFAULT_EVICTION
    return {
        DEFAULT_ROW: lambda h, t, c: engine_replay(h, t, c, default, swapper=True),
        f"{default} + evicting swapper (substitute, lowbit, cpu)":
            lambda h, t, c: engine_replay(h, t, c, default, swapper=True, evict=True),
        "LRU": lambda h, t, c: engine_replay(h, t, c, "lru"),
        "LFU, decayed": lambda h, t, c: engine_replay(h, t, c, "lfu"),
        "static (first half)": static,
        "Belady MIN": belady,
        "default + co-activation prefetch": lambda h, t, c: engine_replay(h, t, c, default, swapper=True,
                                                                          prefetch="co-activation"),
        "default + router prefetch": lambda h, t, c: engine_replay(h, t, c, default, swapper=True, prefetch="router"),
    }


@dataclass
class Report:
    trace: Path
    header: TraceHeader
    tokens: int
    decode: int
    rows: dict[tuple[str, str], Tally] = field(default_factory=dict)


def measure(path: Path, budgets: list[str]) -> Report:
    header, tokens = read_trace(path)
    report = Report(path, header, len(tokens), sum(t.phase == "decode" for t in tokens))
    for budget in budgets:
        caps = capacities(header, budget)
        for name, run in contenders().items():
            report.rows[(name, budget)] = run(header, tokens, caps)
    return report


def write(report: Report, budgets: list[str], out: Path) -> Path:
    """``replay-<trace>.md`` and its plot, written into ``out`` (and nowhere else)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report.header
    stem = f"replay-{report.trace.stem}"
    size = h.expert_bytes or NOMINAL
    lines = [
        f"# Routing trace replay: {report.trace.name}", "", stamp() + ". Written by `python -m benchmarks replay`.", "",
        (f"{h.model} ({h.family}), {len(h.layers)} MoE layers x {h.experts} experts, top-{h.top_k}; "
        f"{report.tokens} tokens, {report.decode} of them decoded. Committee sizes from the engine's planner; "
        "hit rates over decode tokens (the static committee: the second half's), prompt tokens apart. "
        f"Moved: experts loaded x {'the expert size' if h.expert_bytes else 'a nominal 1 MiB'}."), "",
        ("| contender | budget | decode hit rate | x Belady | prompt hit rate | MiB moved | MiB / decode token | "
         "prefetch precision | prefetch recall |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, budget), t in report.rows.items():
        precision = f"{t.right / t.predicted:.2f}" if t.predicted else "-"
        recall = f"{t.right / t.used:.2f}" if t.used else "-"
        prompt = "-" if name.startswith("static") else f"{t.prompt_hit_rate:.3f}"
        best = report.rows[("Belady MIN", budget)].hit_rate
        lines.append(f"| {name} | {budget} | {t.hit_rate:.3f} | {t.hit_rate / best:.2f} | {prompt} | "
                     f"{t.loads * size / 2**20:.1f} | {t.decode_loads * size / 2**20 / max(report.decode, 1):.2f} | "
                     f"{precision} | {recall} |")
    lines += ["", "## Targets (issue 33)", "", *targets(report)]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = dict.fromkeys(name for name, _ in report.rows)
    for name in names:
        xs = [int(b.rstrip("%")) for b in budgets]
        ax.plot(xs, [report.rows[(name, b)].hit_rate for b in budgets], marker="o", label=name,
                linestyle="--" if name == "Belady MIN" else "-")
    ax.set(xlabel="budget (% of expert bytes)", ylabel="decode hit rate", title=report.trace.name)
    ax.legend(fontsize=7)
    fig.text(0.01, 0.01, stamp(), fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![decode hit rate against budget]({stem}.png)", ""]
    table = out / f"{stem}.md"
    table.write_text("\n".join(lines))
    return table


def targets(report: Report) -> list[str]:
    """The policy targets, each met or not: 0.95x Belady's decode hit rate at 50% and 0.90x at 25%, never more
    than half a point below LRU, at most 1.1x Belady's bytes per decode token."""
    budgets = sorted({budget for _, budget in report.rows}, key=lambda b: int(b.rstrip("%")))
    lines = []
    for budget in budgets:
        default, lru = report.rows[(DEFAULT_ROW, budget)], report.rows[("LRU", budget)]
        best = report.rows[("Belady MIN", budget)]
        wanted = {"50%": 0.95, "25%": 0.90}.get(budget)
        if wanted is not None:
            ratio = default.hit_rate / best.hit_rate
            lines.append(f"- {budget}: default at least {wanted}x Belady: {default.hit_rate:.3f} against "
                         f"{best.hit_rate:.3f} ({ratio:.2f}x): {'met' if ratio >= wanted else 'not met'}")
        below = lru.hit_rate - default.hit_rate
        lines.append(f"- {budget}: never more than 0.5 points below LRU: {default.hit_rate:.3f} against "
                     f"{lru.hit_rate:.3f}: {'met' if below <= 0.005 else 'not met'}")
        moved = default.decode_loads / max(best.decode_loads, 1)
        lines.append(f"- {budget}: bytes per decode token at most 1.1x Belady's: {moved:.2f}x: "
                     f"{'met' if moved <= 1.1 else 'not met'}")
    return lines


def main(traces: list[str], budgets: list[str], out: Path) -> list[Path]:
    """Replay each trace; its table and plot go into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    return [write(measure(Path(trace), budgets), budgets, out) for trace in traces]
