"""What capping oneDNN's and ideep's kernel caches costs and saves on the CPU (see engine/weights/host_memory.py).

Each run is a fresh process on the default model at 50%: 120 one-token replies to prompts of 120 distinct
lengths (the resident set's growth after the first 20 is what the caps bound), then a 256-token prefill
and 64 greedy decode tokens (what the caps could cost, if a step's kernels no longer fitted), under the
shipped caps, tighter ones and none (both caches at their defaults). Runs go round-robin, medians of
``repeats``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .speed import model_folder
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # oneDNN's kernels, ideep's computations
    "shipped: 128 / 32": {},
    "16 / 16": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"},
    "uncapped: 1024 / 1024 (their defaults)": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"},
}
CHILD = """
import json, sys, time
import psutil, torch
from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings
torch.set_num_threads(2)
process, one = psutil.Process(), SamplingSettings(max_new_tokens=1, temperature=0)
with Engine.load(sys.argv[1], budget="50%") as engine:
    for n in range(1, 121):
        engine.forget_kept_caches()  # every length a prompt of its own, not the last one's continuation
        list(engine.generate(list(range(10, 10 + n)), one))
        if n == 20:
            settled = process.memory_info().rss
    grown = process.memory_info().rss - settled
    engine.forget_kept_caches()
    start = time.perf_counter()
    list(engine.generate(list(range(10, 266)), one))
    prefill = 256 / (time.perf_counter() - start)
    list(engine.generate([10, 11, 12], SamplingSettings(max_new_tokens=64, temperature=0)))
    print(json.dumps({"grown_mib": grown / 2**20, "prefill": prefill, "decode": engine.stats().tokens_per_s}))
"""


def main(repeats: int = 3) -> Path:
    folder = model_folder("default")
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name, env in SETTINGS.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True,
                                 check=True, env={**os.environ, **env})
            runs[name].append(json.loads(out.stdout.splitlines()[-1]))
    lines = [f"# Kernel caches on the CPU: default model, 50%, medians of {repeats} fresh processes", "",
             stamp(), "",
             ("| caps (oneDNN / ideep) | RSS growth, replies 21-120 (MiB) | prefill, 256 tokens (tok/s) "
             "| decode (tok/s) |"),
             "| --- | ---: | ---: | ---: |"]
    for name, found in runs.items():
        median = {key: statistics.median(r[key] for r in found) for key in found[0]}
        lines.append(f"| {name} | {median['grown_mib']:.0f} | {median['prefill']:.0f} | {median['decode']:.1f} |")
    path = RESULTS / "kernel-caches-default-cpu.md"
    path.write_text("\n".join(lines) + "\n")
    return path
