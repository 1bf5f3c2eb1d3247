"""Quality against budget with the default model's real routing: perplexity and top-1 agreement.

Every configuration scores the same held-out tokens through ``Engine.score`` (KV cache, 16-token
chunks under decode rules, the swapper between chunks) and is compared with the full model (100%,
exact): its perplexity, and the share of positions where its top-1 prediction equals the full
model's. Policies: ``exact`` (misses loaded; must agree 100%), ``substitute`` (dynamic committee,
misses routed to a resident expert), ``skip`` (routings under 0.3 dropped, misses loaded) and a
static committee: the N experts per layer the full model routes to most on calibration text (the
even pydoc topics, never the scored text), pinned, nothing ever loaded: what dynamic swapping buys.
Usage: python -m benchmarks quality (CPU, about 15 minutes on 2 cores).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from expertswap.engine import Engine
from expertswap.models.default_model import resolve_model
from expertswap.models.default_model.gguf_source import find_gguf, load_tokenizer
from tools.recipe.data import calibration_texts, heldout

from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
TOKENS = {"pydoc": 128, "gpl3": 2048}  # first tokens of each odd pydoc topic / of the GPL-3
BUDGETS = ("25%", "50%", "75%")
CALIBRATION_TOKENS = 128


def texts(tokenizer) -> dict[str, list[list[int]]]:
    docs = heldout()
    return {name: [tokenizer(t, add_special_tokens=False)["input_ids"][:TOKENS[name]] for t in docs[name]]
            for name in TOKENS}


def run(engine: Engine, docs: dict[str, list[list[int]]]) -> dict[str, dict]:
    """Per text: mean NLL and top-1 predictions of every scored position."""
    out = {}
    for name, items in docs.items():
        scores = [engine.score(ids) for ids in items]
        out[name] = {"nll": torch.cat([s.nll for s in scores]), "top1": torch.cat([s.top1 for s in scores])}
    return out


def routing_counts(folder: Path, calibration: list[list[int]]) -> dict[int, list[int]]:
    """How often the full model routes to each expert on the calibration text."""
    with Engine.load(folder, budget="100%", dtype="float32", swapper=False) as engine:
        for ids in calibration:
            engine.logits(ids)
        return engine.residency().routed


def measure(folder: Path) -> tuple[list[dict], dict]:
    tokenizer = load_tokenizer(find_gguf())
    docs = texts(tokenizer)
    calibration = [
        tokenizer(t, add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS] for t in calibration_texts()
    ]
    counts = routing_counts(folder, calibration)
    rows = []
    with Engine.load(folder, budget="100%", dtype="float32") as engine:
        reference = run(engine, docs)
    rows.append(row("full model", "100%", reference, reference))
    configs = [("exact", "25%")] + [(p, b) for b in BUDGETS for p in ("substitute", "static", "skip")]
    for policy, budget in configs:
        kind = "substitute" if policy == "static" else policy
        with Engine.load(folder, budget=budget, policy=kind, dtype="float32",
                         skip_threshold=0.3 if policy == "skip" else 0.0) as engine:
            if policy == "static":
                engine.pin_committee({c.layer: top(counts[c.layer], c.capacity) for c in engine.committees})
            result = run(engine, docs)
        rows.append(row(policy, budget, result, reference))
        print(rows[-1], flush=True)
    return rows, {name: sum(len(d) - 1 for d in items) for name, items in docs.items()}


def top(counts: list[int], n: int) -> list[int]:
    return sorted(range(len(counts)), key=lambda e: -counts[e])[:n]


def row(policy: str, budget: str, result: dict, reference: dict) -> dict:
    out = {"policy": policy, "budget": budget}
    for name in result:
        out[f"{name}_ppl"] = math.exp(result[name]["nll"].mean().item())
        out[f"{name}_agree"] = (result[name]["top1"] == reference[name]["top1"]).float().mean().item()
    return out


def write(rows: list[dict], tokens: dict[str, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamped = stamp()
    lines = [
        "# Quality against budget: the default model's real routing",
        "",
        stamped + ". Written by `python -m benchmarks quality`.",
        "",
        (f"Held-out text: the first {TOKENS['pydoc']} tokens of each odd pydoc topic ({tokens['pydoc']} scored tokens) "
        "and the first"),
        (f"{TOKENS['gpl3']} of the GPL-3 ({tokens['gpl3']}), float32, through `Engine.score` (KV cache, "
         "16-token chunks under decode"),
        "rules). Agreement: share of positions whose top-1 token equals the full model's. Static committee: the",
        "N most routed experts per layer on calibration text (even pydoc topics), pinned, never swapped, misses",
        ("substituted. Budgets are shares of the routed experts' bytes: 25% = 2 of 8 experts per layer "
        "(top-2: the minimum)."),
        "",
        "| policy | budget | pydoc ppl | pydoc top-1 agreement | GPL-3 ppl | GPL-3 top-1 agreement |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['budget']} | {r['pydoc_ppl']:.2f} | {r['pydoc_agree']:.1%} | "
                     f"{r['gpl3_ppl']:.2f} | {r['gpl3_agree']:.1%} |")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, name in zip(axes, ("pydoc", "gpl3"), strict=True):
        for policy in ("exact", "substitute", "static", "skip"):
            pts = [(int(r["budget"].rstrip("%")), r[f"{name}_agree"]) for r in rows if r["policy"] == policy]
            ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        ax.set(xlabel="budget (% of expert bytes)", ylabel="top-1 agreement with the full model", title=name)
    axes[0].legend(fontsize=8)
    fig.text(0.01, 0.01, stamped, fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality-default-cpu.png", dpi=120)
    lines += ["", "![top-1 agreement against budget](quality-default-cpu.png)", ""]
    out = RESULTS / "quality-default-cpu.md"
    out.write_text("\n".join(lines))
    return out


def main() -> Path:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    rows, tokens = measure(resolve_model("default"))
    return write(rows, tokens)
