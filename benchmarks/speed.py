"""Decode speed, latency and memory of every contender at 25/50/75/100% of expert bytes, interleaved.

Each measurement is a fresh child process (``benchmarks.contenders``); repeats go round-robin over all
contenders and budgets so drift hits everyone alike; tables report medians and ratios to accelerate.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .contenders import run_dtype
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
POLICIES = {"cpu": ("exact", "substitute", "skip"), "cuda": ("exact", "substitute", "skip", "cpu")}
LABELS = {"full": "full residency", "accelerate": "accelerate offload", "lru": "LRU on demand"}
# random weights in the real layer shapes (attention heads of 128 dims); fewer layers to fit the time
SHAPES = {
    "olmoe-shape": (
        "olmoe",
        {"num_experts": 64, "top_k": 8, "hidden": 2048, "intermediate": 1024, "heads": 16, "vocab_size": 50304},
    ),
    "qwen3-shape": (
        "qwen3_moe",
        {"num_experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768, "heads": 16, "vocab_size": 151936},
    ),
}
LAYERS = {"cpu": 2, "cuda": 2}  # each GPU call must build and sweep within 10 minutes


def model_folder(name: str, device: str = "cpu") -> Path:
    """``default`` (the built-in model) or a name in SHAPES (OLMoE-1B-7B / Qwen3-30B-A3B layer shapes)."""
    if name == "default":
        from expertswap.models.default_model import resolve_model

        return resolve_model("default")
    from tools.synthetic import build_model

    family, shape = SHAPES[name]
    layers = LAYERS[device]
    folder = Path(tempfile.gettempdir()) / f"expertswap-{name}-{layers}"
    if not (folder / "config.json").exists():
        build_model(family, folder, dtype=torch.bfloat16, init_std=0.02, layers=layers, **shape)
    return folder


def label(kind: str) -> str:
    return LABELS.get(kind, kind.replace("expertswap:", "ExpertSwap "))


def vram(row: dict) -> str:
    return f"{row['peak_vram'] / 2**20:.0f} | "


def describe(name: str, device: str) -> str:
    if name == "default":
        return "the built-in default model (SmolLM2-135M cut into a Qwen2-MoE, 28 MoE layers x 8 experts, top-2)"
    family, shape = SHAPES[name]
    return (
        f"random {family} weights, {LAYERS[device]} layers of {shape['num_experts']} experts (top-{shape['top_k']}, "
        f"hidden {shape['hidden']}, expert width {shape['intermediate']}), the real model's layer shapes"
    )


def measure(kind: str, folder: Path, budget: str, tokens: int, device: str) -> dict:
    """One contender in a fresh process; a contender that cannot run there returns {"error": its last words}."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.contenders", kind, str(folder), budget, str(tokens), device],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"),
    )
    if run.returncode:
        return {"error": (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1][:160]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def sweep(model: str, device: str, tokens: int, repeats: int, budgets: tuple[str, ...],
          progress: Callable[[str, list[dict]], None], only: tuple[str, ...] = ()) -> list[dict]:
    """Every contender (or those in ``only``) at every budget, round-robin; ``progress`` gets the rows so far."""
    folder = model_folder(model, device)
    contenders = ("accelerate", "lru", *(f"expertswap:{p}" for p in POLICIES[device]))
    contenders = tuple(c for c in contenders if not only or c.rpartition(":")[2] in only)
    plan = [("full", "100%"), ("floor", "-")] + [(k, b) for b in budgets for k in contenders]
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in plan}
    for repeat in range(repeats):
        for key in plan:
            start = time.perf_counter()
            runs[key].append(measure(key[0], folder, key[1], tokens, device))
            progress(
                f"{model} repeat {repeat + 1}/{repeats}: {key[0]} at {key[1]} ({time.perf_counter() - start:.0f} s)",
                summarise(runs),
            )
    return summarise(runs)


def summarise(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Median row per (contender, budget) measured so far; a failed run marks its row failed."""
    rows = []
    full = runs[("full", "100%")]
    for (kind, budget), results in runs.items():
        if not results:
            continue
        if failed := next((r["error"] for r in results if "error" in r), None):
            rows.append({"kind": kind, "budget": budget, "error": failed})
            continue
        med = {
            m: statistics.median(r[m] for r in results)
            for m in ("tok_s", "ttft", "p50_ms", "p99_ms", "peak_rss", "peak_vram")
        }
        hit = [r["hit_rate"] for r in results if r["hit_rate"] is not None]
        moved = [r["bytes_loaded"] for r in results if r["bytes_loaded"] is not None]
        same = bool(full) and all(r["ids"] == full[0]["ids"] for r in results)
        rows.append(
            {
                "kind": kind,
                "budget": budget,
                **med,
                "hit_rate": statistics.median(hit) if hit else None,
                "bytes_loaded": statistics.median(moved) if moved else None,
                "same_tokens": same,
                "n": len(results),
            }
        )
    return rows


def memory_bound(floor: int, rows: list[dict], folder: Path, device: str) -> list[str]:
    """Each exact row's peak RSS against the runtime floor + non-expert bytes + budget, plus 10%."""
    from transformers import AutoConfig

    from expertswap.models.fit import fit_report

    scale = run_dtype(device).itemsize / AutoConfig.from_pretrained(folder).dtype.itemsize  # checkpoint -> run dtype
    lines = ["", "## Whole-process memory", "",
             (f"Runtime floor measured in this run (torch, transformers, the engine and the tokenizer, no weights): "
             f"{floor / 2**20:.0f} MiB. Bound = 1.1 x (floor + non-expert bytes + budget), in the run dtype."), "",
             "| budget | peak RSS MiB | bound MiB | within |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        report = fit_report(folder, r["budget"])
        bound = 1.1 * (floor + (report.non_expert_bytes + report.budget_bytes) * scale)
        lines.append(f"| {r['budget']} | {r['peak_rss'] / 2**20:.0f} | {bound / 2**20:.0f} | "
                     f"{'yes' if r['peak_rss'] <= bound else 'no'} |")
    return lines


def write(rows: list[dict], model: str, device: str, tokens: int, repeats: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = device == "cuda"
    accel = {r["budget"]: r["tok_s"] for r in rows if r["kind"] == "accelerate" and "error" not in r}
    full = next(r["tok_s"] for r in rows if r["kind"] == "full")
    floor = next((r for r in rows if r["kind"] == "floor" and "error" not in r), None)
    rows = [r for r in rows if r["kind"] != "floor"]
    stamped = stamp(device)
    lines = [
        f"# Decode speed and memory: {model} on {device}",
        "",
        stamped + ".",
        (
            f"Greedy, {tokens} new tokens after a chat prompt, {str(run_dtype(device)).removeprefix('torch.')}"
            f"{', experts in pinned host RAM' if device == 'cuda' else ''}; medians of {repeats} runs, "
            "each a fresh process, "
            "contenders interleaved round-robin. `same tokens`: identical to full residency in every run."
        ),
        "",
        f"Model: {describe(model, device)}.",
        "",
        (
            "| contender | budget | tokens/s | x accelerate | x full | first token (s) | p50 ms | p99 ms | hit rate | "
            "MiB moved | "
            f"peak RSS MiB | {'peak VRAM MiB | ' if cuda else ''}same tokens |"
        ),
        ("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        f"{'---: | ' if cuda else ''}--- |"),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {label(r['kind'])} | {r['budget']} | failed: `{r['error'].replace('|', '/')}` |")
            continue
        ratio = f"{r['tok_s'] / accel[r['budget']]:.1f}" if r["budget"] in accel else "-"
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
        moved = "-" if r["bytes_loaded"] is None else f"{r['bytes_loaded'] / 2**20:.0f}"
        lines.append(
            f"| {label(r['kind'])} | {r['budget']} | {r['tok_s']:.2f} | {ratio} | "
            f"{r['tok_s'] / full:.2f} | {r['ttft']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {hit} | {moved} | "
            f"{r['peak_rss'] / 2**20:.0f} | {vram(r) if cuda else ''}"
            f"{'yes' if r['same_tokens'] else 'no'} |")
    exact50 = next(
        (r for r in rows if r["kind"] == "expertswap:exact" and r["budget"] == "50%" and "error" not in r), None
    )
    sub50 = next(
        (r for r in rows if r["kind"] == "expertswap:substitute" and r["budget"] == "50%" and "error" not in r), None
    )
    lines += ["", "## Targets", ""]
    if exact50 and "50%" not in accel:
        lines.append("- `exact` at 50% >= 3x accelerate offloading: accelerate could not run at 50% (above).")
    elif exact50:
        x = exact50["tok_s"] / accel["50%"]
        lines.append(f"- `exact` at 50% >= 3x accelerate offloading: {x:.1f}x, {'met' if x >= 3 else 'not met'}.")
    if sub50:
        x = sub50["tok_s"] / full
        lines.append(f"- `substitute` at 50% >= 0.8x full residency: {x:.2f}x, {'met' if x >= 0.8 else 'not met'}.")
    if floor:
        lines += memory_bound(
            floor["peak_rss"],
            [r for r in rows if r["kind"] == "expertswap:exact" and "error" not in r],
            model_folder(model, device),
            device,
        )
    stem = f"speed-{model}-{device}"
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"] != "full"):
        pts = [(int(r["budget"].rstrip("%")), r["tok_s"]) for r in rows if r["kind"] == kind and "error" not in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label(kind))
    ax.axhline(full, color="black", linestyle="--", label="full residency")
    ax.set(xlabel="budget (% of expert bytes)", ylabel="decode tokens/s", title=f"{model} on {device}")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, stamped, fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    lines += ["", f"![decode tokens/s against budget]({stem}.png)", ""]
    out = RESULTS / f"{stem}.md"
    out.write_text("\n".join(lines))
    return out
