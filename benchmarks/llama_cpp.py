"""ExpertSwap against llama.cpp on the CPU: the same weights at the same precision, side by side in one run.

    python -m benchmarks llama-cpp --folder HF_DIR --gguf MODEL-BF16.gguf MODEL-Q8_0.gguf --llama-bench PATH
                                   [--cap-mib N]

llama.cpp is what users compare us with. It is built for benchmarks only, from the sources the
``llama-cpp-python`` sdist vendors (README, Performance), and is never a dependency of the product.
Each measurement is a fresh process; repeats go round-robin; medians. With ``--cap-mib`` every
contender runs in a child memory cgroup (cgroup v1 ``memory.limit_in_bytes``) holding total
memory, page cache of its mapped files included, to that many MiB; the page cache is dropped before
each capped run (root), since a page counts against the cgroup that first read it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from .contenders import prepack
from .speed import RESULTS
from .stamp import stamp

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _cgroup(cap_mib: int | None) -> list[str]:
    """A command prefix that runs what follows inside a fresh memory cgroup capped at ``cap_mib``."""
    if cap_mib is None:
        return []
    own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
               if line.split(":")[1] == "memory")
    group = CGROUP_ROOT / own.strip("/") / f"bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(cap_mib << 20))
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "capped"]


def _drop_page_cache() -> None:
    """Under a cap, a file's pages count against the cgroup that first read them: start each capped run cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")  # root only; the cap measures nothing without it


def _llama(bench: str, gguf: str, tokens: int, cap: list[str]) -> dict:
    if cap:
        _drop_page_cache()
    cmd = [*cap, "/usr/bin/time", "-v", bench, "-m", gguf, "-t", "2", "-p", "0", "-n", str(tokens), "-r", "1",
           "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = json.loads(done.stdout)[0]
    return {"tok_s": float(result["avg_ts"]), "peak_rss": int(rss.group(1)) * 1024 if rss else 0}


def _ours(kind: str, folder: str, budget: str, tokens: int, cap: list[str]) -> dict:
    if cap:
        _drop_page_cache()
    cmd = [*cap, sys.executable, "-m", "benchmarks.contenders", kind, folder, budget, str(tokens), "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}" + (" (killed: over the cap)" if done.returncode < 0 else "")}
    row = json.loads(lines[-1])
    return {"tok_s": row["tok_s"], "peak_rss": row["peak_rss"], "ids": row["ids"], "hit_rate": row["hit_rate"]}


def main(folder: str, ggufs: list[str], bench: str, tokens: int, repeats: int, budgets: list[str],
         cap_mib: int | None, quantize: list[str] | None = None, plain: bool = True, name: str | None = None) -> Path:
    """Every contender ``repeats`` times round-robin; ExpertSwap at each budget, as stored (and plain
    transformers) unless not ``plain``, and in each of ``quantize`` (its experts quantised when read, as
    ``--quantize`` does; their packed expert files written first). Raw results, token ids included, go to a
    JSON file beside the table."""
    prepack(folder, quantize or [])
    cap = _cgroup(cap_mib)
    plan = [(f"llama.cpp {Path(g).stem}", lambda g=g: _llama(bench, g, tokens, cap)) for g in ggufs]
    if plain:
        plan.append(("plain transformers (bf16, eager)", lambda: _ours("full", folder, "100%", tokens, cap)))
    for kind in [None, *(quantize or [])] if plain else quantize or []:
        label, contender = (f"{kind} ", f"expertswap:exact:{kind}") if kind else ("", "expertswap:exact")
        plan += [(f"ExpertSwap exact {label}{b}", lambda b=b, c=contender: _ours(c, folder, b, tokens, cap))
                 for b in budgets]
    runs: dict[str, list[dict]] = {label: [] for label, _ in plan}
    for _ in range(repeats):
        for label, measure in plan:
            runs[label].append(measure())
            print(label, runs[label][-1], flush=True)
    suffix = f"-cap{cap_mib}" if cap_mib else ""
    path = RESULTS / f"{name or 'llama-cpp-cpu'}{suffix}.md"
    path.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    lines = [f"# ExpertSwap and llama.cpp on the CPU{f', total memory capped at {cap_mib} MiB' if cap_mib else ''}",
             "", stamp("cpu"), "",
             (f"Model: `{Path(folder).name}` (its GGUFs converted by llama.cpp's own `convert_hf_to_gguf.py`). "
             f"Decode only ({tokens} tokens; llama-bench `-p 0 -n {tokens} -t 2`), 2 threads, medians of {repeats} "
             "fresh processes, contenders round-robin."), "",
             *table(runs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def table(runs: dict[str, list[dict]]) -> list[str]:
    """The results table: medians per contender (tok/s to two decimals below 10)."""
    lines = ["| contender | decode tok/s | peak RSS MiB | decode hit rate |", "| --- | ---: | ---: | ---: |"]
    for label, results in runs.items():
        failed = next((r["error"] for r in results if "error" in r), None)
        if failed:
            lines.append(f"| {label} | failed: {failed} | | |")
            continue
        tok_s = statistics.median(r["tok_s"] for r in results)
        rss = statistics.median(r["peak_rss"] for r in results) / 2**20
        hits = [r["hit_rate"] for r in results if r.get("hit_rate") is not None]
        speed = f"{tok_s:.2f}" if tok_s < 10 else f"{tok_s:.1f}"
        lines.append(f"| {label} | {speed} | {rss:.0f} | {f'{statistics.median(hits):.2f}' if hits else ''} |")
    return lines


def convert(source: Path, folder: Path, outtype: str) -> Path:
    """``folder`` as a GGUF of ``outtype`` (``bf16``, ``q8_0``), by the converter of the llama.cpp tree
    ``source``; converted once, kept beside the folder (a half-written file never takes its name)."""
    out = folder.parent / f"{folder.name}-{outtype}.gguf"
    if not out.exists():
        part = out.with_name(out.name + ".part")
        done = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                               outtype, "--outfile", str(part)], capture_output=True, text=True, timeout=900,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf {outtype}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        part.rename(out)
    return out


def bench_gpu(bench: Path, gguf: Path, cpu_layers: list[int], prompts: list[int], tokens: int,
              repeats: int, log: Path) -> list[dict]:
    """llama-bench with every layer on the GPU but the experts of ``cpu_layers[i]`` layers (``--n-cpu-moe``),
    all host threads: decode of ``tokens`` and prefill of each of ``prompts``; llama-bench's own means over
    ``repeats``. Its log goes to ``log``: a failed load says why there, not in the one-line error."""
    cmd = [str(bench), "-m", str(gguf), "-ngl", "99", "-ncmoe", ",".join(map(str, cpu_layers)),
           "-t", str(os.cpu_count()), "-p", ",".join(map(str, prompts)) or "0", "-n", str(tokens), "-r", str(repeats),
           "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    log.write_text(" ".join(cmd) + "\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench {gguf.name}: {(done.stderr.strip().splitlines() or ['killed'])[-1][:160]}")
    return json.loads(done.stdout)
