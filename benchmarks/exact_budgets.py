"""Exact at every budget, at full depth: greedy tokens against the engine's own full residency, and decode speed.

    python -m benchmarks exact-budgets --model olmoe-shape --device cuda --layers 16

A 2-layer model hid a 10x overhead once, so this builds the real depth. One process runs plain
transformers (eager, the same weights and dtype) and the engine at each budget, each generation
repeated; the table gives medians, the hit rate and whether the tokens equal full residency's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .contenders import PROMPT, run_dtype
from .speed import RESULTS, SHAPES
from .stamp import stamp


def _build(model: str, layers: int) -> Path:
    from tools.synthetic import build_model

    family, shape = SHAPES[model]
    folder = Path(tempfile.gettempdir()) / f"expertswap-{model}-{layers}"
    if not (folder / "config.json").exists():
        build_model(family, folder, dtype=torch.bfloat16, init_std=0.02, layers=layers, **shape)
    return folder


def _plain(folder: Path, device: str, ids: list[int], tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Decode tokens/s of plain transformers (eager, growing cache), median of ``repeats``."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=run_dtype(device), device_map=device).eval()
    speeds, out = [], []
    for _ in range(repeats):
        cache, step_ids, out = DynamicCache(config=model.config), torch.tensor([ids], device=device), []
        with torch.inference_mode():
            for n in range(tokens):
                if n == 1:
                    start = time.perf_counter()
                logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                out.append(int(logits[0, -1].argmax()))
                step_ids = torch.tensor([[out[-1]]], device=device)
        speeds.append((tokens - 1) / (time.perf_counter() - start))
    del model
    return statistics.median(speeds), out


def main(model: str, device: str, layers: int, budgets: list[str], tokens: int, repeats: int) -> Path:
    from expertswap.engine import Engine
    from expertswap.protocol import SamplingSettings

    folder = _build(model, layers)
    rows = []
    with Engine.load(folder, budget="100%", device=device, dtype=run_dtype(device), swapper=False) as probe:
        ids = probe.encode(PROMPT)
    plain_speed, plain_tokens = _plain(folder, device, ids, tokens, repeats)
    reference: list[int] | None = None
    for budget in budgets:
        with Engine.load(
            folder, budget=budget, device=device, dtype=run_dtype(device), ram_tier=device == "cuda"
        ) as engine:
            speeds, same = [], []
            for _ in range(repeats):
                engine.forget_kept_caches()  # each repeat prefills the whole prompt, as a fresh chat does
                out = list(engine.generate(ids, SamplingSettings(max_new_tokens=tokens)))
                speeds.append(engine.stats().tokens_per_s)
                reference = reference if reference is not None else out
                same.append(out == reference)
            stats = engine.stats()
            graphs = engine.graphed.graphs_per_token if engine.graphed is not None else 0
            rows.append((budget, statistics.median(speeds), stats.hit_rate, all(same), out == plain_tokens, graphs))
    path = RESULTS / f"exact-budgets-{model}-{device}.md"
    full = rows[0][1] if rows and rows[0][0] == "100%" else None
    lines = [f"# Exact at every budget: {model}, {layers} layers, {device}", "", stamp(device), "",
             (f"Greedy, {tokens} new tokens, {run_dtype(device)}, medians of {repeats} generations in one process"
             f"{', experts in pinned host RAM' if device == 'cuda' else ''}. "
             f"`same as 100%`: the engine's tokens equal its own full residency's in every repetition. "
             f"Plain transformers (eager, same weights): **{plain_speed:.1f} tok/s**."), "",
             ("| budget | tok/s | x plain transformers | x engine 100% | hit rate | CUDA graphs / token "
             "| same as 100% | same as transformers |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for budget, speed, hit, same_full, same_plain, graphs in rows:
        ratio = f"{speed / full:.2f}" if full else "-"
        lines.append(f"| {budget} | {speed:.1f} | {speed / plain_speed:.2f} | {ratio} | {hit:.2f} | {graphs} | "
                     f"{'yes' if same_full else 'NO'} | {'yes' if same_plain else 'no'} |")
    path.write_text("\n".join(lines) + "\n")
    return path
