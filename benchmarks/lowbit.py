"""Mixed precision for misses (HOBBIT's idea) on the default model: what ``lowbit`` costs and how often it acts.

``python -m benchmarks lowbit``: the held-out texts of ``benchmarks/quantized.py`` scored through
``Engine.score`` in bf16 (the first 16-token chunk runs exact, later chunks under decode rules), at 25% and
50% budgets with the background swapper on, as a user runs it: ``lowbit`` (a miss computed from the
expert's nf4 copy, nothing loaded while decoding) against ``substitute`` (a miss sent to the best resident
expert) and ``exact``. Perplexity, top-1 agreement with ``exact``, and the share of routings ``lowbit``
computed from nf4 copies.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from expertswap.engine import Engine
from expertswap.models import resolve_model

from .quantized import _texts
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
BUDGETS = ("25%", "50%")


def _score(folder: Path, budget: str, policy: str, docs: dict[str, list[list[int]]]) -> tuple[dict, float]:
    with Engine.load(folder, budget=budget, policy=policy, dtype="bfloat16") as engine:
        scores = {name: [engine.score(ids) for ids in items] for name, items in docs.items()}
        stats = engine.stats()
    result = {name: (torch.cat([s.nll for s in v]), torch.cat([s.top1 for s in v])) for name, v in scores.items()}
    return result, stats.low_precision / max(stats.hits + stats.misses, 1)


def main() -> Path:
    folder = resolve_model("default")
    docs = _texts()
    exact, _ = _score(folder, "100%", "exact", docs)
    lines = ["# Mixed precision for misses: the default model", "", stamp() + ". Written by "
             "`python -m benchmarks lowbit`.", "",
             "| policy | budget | pydoc ppl | pydoc agreement | GPL-3 ppl | GPL-3 agreement | routings from nf4 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [("exact", "100%", exact, 0.0)]
    for budget in BUDGETS:
        for policy in ("lowbit", "substitute"):
            result, share = _score(folder, budget, policy, docs)
            rows.append((policy, budget, result, share))
    for policy, budget, result, share in rows:
        cells = []
        for name in ("pydoc", "gpl3"):
            nll, top1 = result[name]
            agree = (top1 == exact[name][1]).float().mean().item()
            cells += [f"{math.exp(nll.float().mean().item()):.2f}", f"{agree:.3f}"]
        lines.append(f"| {policy} | {budget} | {' | '.join(cells)} | {share:.1%} |")
    out = RESULTS / "lowbit-default-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    return out
