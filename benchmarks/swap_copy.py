"""GPU swap copies against the pinned host-to-device bandwidth measured in the same run.

Three numbers per model: (1) the bandwidth of one large pinned host tensor copied to the GPU
(what the PCIe/NVLink-C2C link gives), (2) the engine's own swap path in isolation
(``Committee.apply_swaps`` on the copier's stream from the pinned RAM tier, a synchronised batch
per layer as the swapper runs it), and (3) the swap events the engine emitted while decoding
at 25% (reading + staging + copy, as the user gets them). CUDA only.
Usage: python -m benchmarks swap-copy [MODEL ...] (default: olmoe-shape qwen3-shape)
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from expertswap.engine import Engine
from expertswap.engine.moe.committee import Swap
from expertswap.protocol import SamplingSettings, SwapEvent

from .contenders import PROMPT
from .speed import describe, model_folder
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
BURST = 8  # a decode step's misses in one layer at top-8 routing


def pinned_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of one pinned host buffer copied to the device on a side stream (median of repeats)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    rates = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
        end.synchronize()
        rates.append(nbytes / (start.elapsed_time(end) / 1000))
    return statistics.median(rates[1:])  # the first copy pays for warm-up


def swap_path_throughput(engine: Engine, swaps: int, batch: int) -> tuple[float, float]:
    """Bytes/s and ms per expert of ``apply_swaps`` from the pinned RAM tier in batches of ``batch``."""
    rng = random.Random(0)
    moved, copied, elapsed = 0, 0, 0.0
    for n in range(swaps // batch + 2):
        committee = engine.committees[n % len(engine.committees)]
        outside = [e for e in range(committee.num_experts) if e not in committee.resident_experts]
        experts, slots = rng.sample(outside, batch), rng.sample(range(committee.capacity), batch)
        plan = [
            Swap(e, s, engine.store.read(committee.layer, e), "prefetch") for e, s in zip(experts, slots, strict=True)
        ]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with engine.runtime.lock:
            committee.apply_swaps(plan, start, background=True)
        if n >= 2:  # warm-up batches
            elapsed += time.perf_counter() - start
            moved += committee.spec.expert_bytes * batch
            copied += batch
    return moved / elapsed, 1000 * elapsed / copied


def decode_swaps(folder: Path, tokens: int) -> list[SwapEvent]:
    with Engine.load(folder, budget="25%", device="cuda", dtype=torch.bfloat16, ram_tier=True) as engine:
        events = engine.subscribe()
        list(engine.generate(engine.encode_chat([{"role": "user", "content": PROMPT}]),
                             SamplingSettings(max_new_tokens=tokens)))
        return [e for e in events.drain() if isinstance(e, SwapEvent) and e.expert_in >= 0 and e.ms > 0]


def measure(model: str, folder: Path, swaps: int = 64, tokens: int = 64) -> dict:
    with Engine.load(folder, budget="25%", device="cuda", dtype=torch.bfloat16, ram_tier=True,
                     swapper=False) as engine:
        expert_bytes = engine.committees[0].spec.expert_bytes
        batch = engine.swapper.swaps_per_layer
        path_rate, path_ms = swap_path_throughput(engine, swaps, batch)
        burst_rate, _ = swap_path_throughput(engine, swaps, BURST)
    link_big = pinned_bandwidth(256 * 2**20)
    link_expert = pinned_bandwidth(expert_bytes)
    events = decode_swaps(folder, tokens)
    rates = [e.bytes / (e.ms / 1000) for e in events]
    return {"model": model, "expert_bytes": expert_bytes, "link_big": link_big, "link_expert": link_expert,
            "path": path_rate, "path_ms": path_ms, "batch": batch, "burst": burst_rate, "events": len(events),
            "event_rate": statistics.median(rates) if rates else 0.0}


def write(results: list[dict]) -> Path:
    gib = 2**30
    lines = [
        "# GPU swap copies against the measured pinned host-to-device bandwidth", "",
        f"{stamp('cuda')}. bf16, experts in pinned host RAM.", "",
        "Link: one pinned buffer copied to the GPU on a side stream (CUDA events, median of 10). Swap path: the",
        "engine's `apply_swaps` on the copier's stream, one synchronised batch per layer as the swapper runs it",
        f"(its batch: `swaps_per_layer` experts; a miss burst: {BURST}), 64 experts after 2 warm-up batches, wall",
        "time including the lock and the maps. Decode events: the swap events of a 64-token reply at a 25% budget",
        "(reading the experts included). The target is judged on the swapper's batch.", "",
        ("| model | expert MiB | link, 256 MiB copy (GiB/s) | link, one expert's size (GiB/s) | swap path (GiB/s) | "
        f"swap path / link | ms per swap | batch of {BURST} (GiB/s) | decode events | decode swaps (GiB/s, median) | "
        "target (>= 70%) |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        share = r["path"] / r["link_big"]
        lines.append(
            f"| {r['model']} | {r['expert_bytes'] / 2**20:.1f} | {r['link_big'] / gib:.1f} | "
            f"{r['link_expert'] / gib:.1f} | {r['path'] / gib:.1f} (batch of {r['batch']}) | {share:.0%} | "
            f"{r['path_ms']:.2f} | {r['burst'] / gib:.1f} | "
            f"{r['events']} | {r['event_rate'] / gib:.1f} | "
            f"{'met' if share >= 0.7 else 'not met'} |"
        )
    lines += ["", *(f"- {r['model']}: {describe(r['model'], 'cuda')}." for r in results), ""]
    out = RESULTS / "swap-copy-cuda.md"
    out.write_text("\n".join(lines))
    return out


def main(models: list[str]) -> Path:
    return write([measure(m, model_folder(m, "cuda")) for m in models])
