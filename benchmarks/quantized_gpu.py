"""Quantised experts on a GPU: the OLMoE-1B-7B layer shapes (random bf16 weights, 16 layers: the full depth),
bf16 against int8 and nf4 at 100/50/25% of the bf16 expert bytes, experts in pinned RAM; medians of 3 loads,
32 greedy tokens.

``python -m benchmarks quantized-gpu`` (needs CUDA). Prints the table and writes it to
``benchmarks/results/quantized-olmoe-shape-cuda.md``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings
from tools.synthetic import build_model

from .speed import SHAPES
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
PROMPT = "Explain how a Python dictionary stores its keys."


def _decode(folder: Path, budget: str, kind: str | None, ids: list[int]) -> tuple[float, int, int, float]:
    with Engine.load(folder, budget=budget, device="cuda", dtype=torch.bfloat16, quantize=kind, ram_tier=True) as e:
        times, last = [], time.perf_counter()
        for _ in e.generate(ids, SamplingSettings(max_new_tokens=32)):
            torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last)
            last = now
        return (len(times) - 1) / sum(times[1:]), sum(c.capacity for c in e.committees), e.total_experts, \
            e.stats().hit_rate


def main(layers: int = 16, shares: tuple[int, ...] = (100, 50, 25),
         kinds: tuple[str | None, ...] = (None, "int8", "nf4")) -> Path:
    family, shape = SHAPES["olmoe-shape"]
    folder = build_model(family, Path(tempfile.mkdtemp()) / "m", dtype=torch.bfloat16, init_std=0.02, layers=layers,
                         **shape)
    with Engine.load(folder, budget="100%", device="cuda", dtype=torch.bfloat16, swapper=False) as engine:
        plain = engine.total_expert_bytes
        ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
    lines = [f"# Quantised experts on the GPU: OLMoE-1B-7B layer shapes, {layers} layers", "",
             stamp("cuda") + ". Written by `python -m benchmarks quantized-gpu`.", "",
             "| experts | budget (of bf16 bytes) | decode tok/s | experts held | hit rate |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for share in shares:
        for kind in kinds:
            runs = [_decode(folder, f"{plain * share // 100}B", kind, ids) for _ in range(3)]
            rate = statistics.median(r[0] for r in runs)
            _, held, total, hit = runs[-1]
            lines.append(f"| {kind or 'bf16'} | {share}% | {rate:.1f} | {held} of {total} | {hit:.2f} |")
    out = RESULTS / "quantized-olmoe-shape-cuda.md"
    out.write_text("\n".join(lines) + "\n")
    return out
