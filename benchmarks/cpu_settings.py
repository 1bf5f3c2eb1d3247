"""CPU decode under each thread count, memory allocator and OpenMP wait policy: what the engine should run with.

    python -m benchmarks cpu-settings --folder MODEL [--quantize int8+dense] [--budget 100%] [--repeats 3]

Every variant is a fresh process of the same contender (``benchmarks.contenders``), repeats round-robin,
medians: the engine as it loads by itself (torch's threads: one per physical core the process may use), one
thread, one per logical CPU where that is more, OpenMP's threads spinning between parallel regions or sleeping
(``OMP_WAIT_POLICY``), and the process under jemalloc or tcmalloc instead of glibc's malloc (``LD_PRELOAD``,
where the library is installed). The results say which setting to keep; the engine keeps torch's threads and
glibc unless a row beats them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .contenders import prepack
from .speed import RESULTS
from .stamp import stamp

LIBRARIES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
SEARCHED = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib"),
            Path("/usr/local/lib"))


def variants() -> dict[str, dict[str, str]]:
    """Each variant's environment on top of this one's (the first is the engine as it loads by itself)."""
    import torch

    physical, logical = torch.get_num_threads(), len(os.sched_getaffinity(0))
    out: dict[str, dict[str, str]] = {f"as loaded ({physical} threads)": {}, "1 thread": {"OMP_NUM_THREADS": "1"}}
    if logical > physical:
        out[f"{logical} threads (every logical CPU)"] = {"OMP_NUM_THREADS": str(logical)}
    out["OpenMP threads spin (OMP_WAIT_POLICY=active)"] = {"OMP_WAIT_POLICY": "active"}
    for spins in (3_000_000, 30_000_000):  # libgomp spins 300,000 times by default, then sleeps
        out[f"OpenMP threads spin longer (GOMP_SPINCOUNT={spins:_})"] = {"GOMP_SPINCOUNT": str(spins)}
    out["OpenMP threads sleep (OMP_WAIT_POLICY=passive)"] = {"OMP_WAIT_POLICY": "passive"}
    for name, library in LIBRARIES.items():
        found = next((folder / library for folder in SEARCHED if (folder / library).exists()), None)
        if found is not None:
            out[f"{name} (LD_PRELOAD)"] = {"LD_PRELOAD": str(found)}
    return out


def _run(contender: str, folder: str, budget: str, tokens: int, env: dict[str, str]) -> dict:
    run = subprocess.run([sys.executable, "-m", "benchmarks.contenders", contender, folder, budget, str(tokens), "cpu"],
                         capture_output=True, text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", **env))
    if run.returncode:
        return {"error": (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1][:160]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(folder: str, quantize: str | None, budget: str, tokens: int, repeats: int, name: str | None) -> Path:
    contender = "expertswap:exact" + (f":{quantize}" if quantize else "")
    prepack(folder, [quantize] if quantize else [])
    plan = variants()
    runs: dict[str, list[dict]] = {key: [] for key in plan}
    for _ in range(repeats):
        for key, env in plan.items():
            runs[key].append(_run(contender, folder, budget, tokens, env))
    base = statistics.median(r["tok_s"] for r in next(iter(runs.values())) if "tok_s" in r)
    lines = [f"# CPU settings for decode: {Path(folder).name}, {contender} at {budget}", "", stamp(), "",
             (f"Greedy, {tokens} tokens, medians of {repeats} fresh processes, variants round-robin "
              "(`python -m benchmarks cpu-settings`). `vs loaded`: tok/s over the engine as it loads by itself. "
              "`cores busy while idle`: the process's CPU time over half a second after the reply, in cores."), "",
             ("| variant | threads | decode tok/s | vs loaded | peak RSS MiB | cores busy while idle |"),
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, results in runs.items():
        failed = next((r["error"] for r in results if "error" in r), None)
        if failed:
            lines.append(f"| {key} | | failed: `{failed}` | | | |")
            continue
        speed = statistics.median(r["tok_s"] for r in results)
        rss = statistics.median(r["peak_rss"] for r in results) / 2**20
        idle = statistics.median(r["idle_cores"] for r in results)
        lines.append(f"| {key} | {results[0]['threads']} | {speed:.1f} | {speed / base:.2f}x | {rss:.0f} | "
                     f"{idle:.2f} |")
    out = RESULTS / f"{name or 'cpu-settings-' + Path(folder).name}.md"
    out.write_text("\n".join(lines) + "\n")
    return out
