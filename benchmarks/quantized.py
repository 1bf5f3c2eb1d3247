"""Quantised experts on the default model: what each quantisation costs in quality, and what it buys per byte.

``python -m benchmarks quantized [--repeats 3] [--kinds bf16 int8 int8+dense ...]`` (CPU, bf16 as the app runs
here; ``KIND+dense``: ``--dense int8`` beside ``--quantize KIND``, the weights outside the experts in int8 too).
Quality: perplexity of held-out text (the first 128 tokens of each odd pydoc topic, the first 512 of the GPL-3) through
``Engine.score`` under ``exact``, and top-1 agreement with the unquantised model; under ``exact`` neither
depends on the budget. Speed: greedy decode tokens/s in fresh processes (medians), at 100/50/25% of the
*unquantised* expert bytes, with how many experts each budget holds and the hit rate.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from expertswap.engine import Engine
from expertswap.models import resolve_model
from expertswap.models.default_model.gguf_source import find_gguf, load_tokenizer
from expertswap.protocol import QUANTIZATIONS
from tools.recipe.data import heldout

from .contenders import prepack
from .speed import measure
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
TOKENS = {"pydoc": 128, "gpl3": 512}
SHARES = (100, 50, 25)


def _texts() -> dict[str, list[list[int]]]:
    tokenizer = load_tokenizer(find_gguf())
    docs = heldout()
    return {name: [tokenizer(t, add_special_tokens=False)["input_ids"][: TOKENS[name]] for t in docs[name]]
            for name in TOKENS}


def quality(folder: Path, kinds: list[str | None]) -> dict[str | None, dict[str, float]]:
    docs = _texts()
    scored: dict[str | None, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for kind in kinds:
        with Engine.load(folder, budget="100%", dtype="bfloat16", swapper=False, **_options(kind)) as engine:
            scores = {name: [engine.score(ids) for ids in items] for name, items in docs.items()}
        scored[kind] = {name: (torch.cat([s.nll for s in v]), torch.cat([s.top1 for s in v]))
                        for name, v in scores.items()}
    out = {}
    for kind, result in scored.items():
        row = {}
        for name, (nll, top1) in result.items():
            row[f"{name}_ppl"] = math.exp(nll.float().mean().item())
            row[f"{name}_agree"] = (top1 == scored[None][name][1]).float().mean().item()
        out[kind] = row
    return out


def speed(folder: Path, repeats: int, kinds: list[str | None]) -> list[dict]:
    prepack(str(folder), [k for k in kinds if k])
    with Engine.load(folder, budget="100%", swapper=False) as engine:
        plain_total = engine.total_expert_bytes
    plan = [(kind, share) for share in SHARES for kind in kinds]
    runs: dict[tuple[str | None, int], list[dict]] = {key: [] for key in plan}
    for _ in range(repeats):
        for kind, share in plan:
            budget = f"{plain_total * share // 100}B"
            contender = "expertswap:exact" + (f":{kind}" if kind else "")
            runs[(kind, share)].append(measure(contender, folder, budget, 48, "cpu"))
    rows = []
    for (kind, share), results in runs.items():
        with Engine.load(folder, budget=f"{plain_total * share // 100}B", swapper=False, **_options(kind)) as engine:
            held = sum(c.capacity for c in engine.committees)
            total = engine.total_experts
        failed = next((r["error"] for r in results if "error" in r), None)
        rows.append({"kind": kind, "share": share, "held": held, "experts": total, "error": failed,
                     **({} if failed else {m: statistics.median(r[m] for r in results)
                                           for m in ("tok_s", "hit_rate", "peak_rss")})})
    return rows


def _options(kind: str | None) -> dict[str, str | None]:
    """``Engine.load``'s quantisation options for a kind of this benchmark (``KIND`` or ``KIND+dense``)."""
    quantize, _, dense = (kind or "").partition("+")
    return {"quantize": quantize or None, "dense": "int8" if dense else None}


def write(quality_rows: dict[str | None, dict[str, float]], speed_rows: list[dict], repeats: int) -> Path:
    name = {None: "bf16 (as stored)"}
    lines = [
        "# Quantised experts: the default model", "", stamp() + ". Written by `python -m benchmarks quantized`.", "",
        "## Quality (exact; the same at every budget)", "",
        (f"Held-out text: the first {TOKENS['pydoc']} tokens of each odd pydoc topic and the first {TOKENS['gpl3']} "
        "of the GPL-3, scored through `Engine.score` in bf16. Agreement: positions whose top-1 token equals the "
        "unquantised model's."), "",
        "| experts | pydoc ppl | pydoc cost | pydoc top-1 agreement | GPL-3 ppl | GPL-3 cost | GPL-3 agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = quality_rows[None]
    for kind, r in quality_rows.items():
        pydoc_cost = r["pydoc_ppl"] / base["pydoc_ppl"] - 1
        lines.append(f"| {name.get(kind, kind)} | {r['pydoc_ppl']:.2f} | {pydoc_cost:+.1%} | "
                     f"{r['pydoc_agree']:.3f} | {r['gpl3_ppl']:.2f} | {r['gpl3_ppl'] / base['gpl3_ppl'] - 1:+.1%} | "
                     f"{r['gpl3_agree']:.3f} |")
    lines += ["", f"## Speed (greedy, 48 tokens, medians of {repeats} fresh processes)", "",
              "Budgets are shares of the unquantised expert bytes; a quantised model holds more experts in them.", "",
              "| experts | budget (of bf16 bytes) | experts held | decode tok/s | hit rate | peak RSS MiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in speed_rows:
        if r["error"]:
            lines.append(f"| {name.get(r['kind'], r['kind'])} | {r['share']}% | failed: `{r['error']}` | | | |")
            continue
        lines.append(f"| {name.get(r['kind'], r['kind'])} | {r['share']}% | {r['held']} of {r['experts']} | "
                     f"{r['tok_s']:.1f} | {r['hit_rate']:.2f} | {r['peak_rss'] / 2**20:.0f} |")
    lines += ["", "## Targets", "", *_targets(quality_rows, speed_rows)]
    out = RESULTS / "quantized-default-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _targets(quality_rows: dict[str | None, dict[str, float]], speed_rows: list[dict]) -> list[str]:
    """Each target whose contenders ran: (kind, share, against share, speed ratio, perplexity cost)."""
    wanted = [("int8", 100, 100, 1.3, 0.01), ("int8+dense", 100, 100, 1.3, 0.01), ("nf4", 25, 25, 1.0, 0.05),
              ("int4", 25, 25, 1.0, 0.05)]
    rows = {(r["kind"], r["share"]): r for r in speed_rows if not r["error"]}
    base = quality_rows[None]
    lines = []
    for kind, share, against, ratio, budget in wanted:
        mine, plain = rows.get((kind, share)), rows.get((None, against))
        if mine is None or plain is None or kind not in quality_rows:
            continue
        cost = quality_rows[kind]["pydoc_ppl"] / base["pydoc_ppl"] - 1
        met = mine["tok_s"] >= ratio * plain["tok_s"] and cost < budget
        lines.append(f"- {kind} at {share}% at least {ratio}x bf16 at {against}% of the same bytes, for a perplexity "
                     f"cost under {budget:.0%}: {mine['tok_s']:.1f} against {plain['tok_s']:.1f} tok/s "
                     f"({mine['tok_s'] / plain['tok_s']:.2f}x), cost {cost:+.1%} (pydoc): "
                     f"{'met' if met else 'not met'}.")
    return lines


def main(repeats: int, kinds: list[str] | None = None) -> Path:
    """``kinds``: 'bf16' (as stored, always run: the others are measured against it) and quantisations; all by
    default."""
    chosen: list[str | None] = [None, *[k for k in (kinds or QUANTIZATIONS) if k != "bf16"]]
    folder = resolve_model("default")
    return write(quality(folder, chosen), speed(folder, repeats, chosen), repeats)
