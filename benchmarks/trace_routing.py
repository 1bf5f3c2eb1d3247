"""Decode speed under a real model's routing: a synthetic model of its shape replays the recorded expert choices.

    python -m benchmarks trace-decode TRACE.jsonl [--layers N] [--budgets 100% 75% 50% 25%] --out DIR

A random-weight router spreads a token over the experts almost uniformly and, with the swapper, hits nearly
every lookup at 50%: it hid the miss path's cost. Here every MoE layer's router is replaced by a
``TraceRouter``, which returns the trace's experts (and weights, or equal ones where the trace has none) for
each position, so the committees see what the real model asked for. Its table sits on the device and its
position is a device tensor: a captured CUDA graph replays it like the model's own router.

Each budget runs in a fresh process; the synthetic model's own (random) routing runs beside it as the best
case. Tokens are greedy: at every budget they must equal the engine's own 100% under the same routing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from expertswap.engine.decode.compact_step import cache_size

from .stamp import stamp

if TYPE_CHECKING:
    from expertswap.engine import Engine

# a trace's model -> the synthetic family and shape that stands in for it (random weights, real layer shapes;
# the families are those the compact step and its CUDA graphs cover). Granite's stand-in is an OLMoE, whose
# llama.cpp loader needs as many key/value heads as heads: the same weights then run in both.
SHAPES = {
    "granite-3.0-1b-a400m-instruct": ("olmoe", {"num_experts": 32, "top_k": 8, "hidden": 1024, "intermediate": 512,
                                                "heads": 16, "kv_heads": 16, "vocab_size": 49155}),
    "Qwen1.5-MoE-A2.7B-Chat-4bit": ("qwen2_moe", {"num_experts": 60, "top_k": 4, "hidden": 2048,
                                                  "intermediate": 1408, "heads": 16, "vocab_size": 151936}),
    "Mixtral-8x7B-Instruct-v0.1-FP8": ("mixtral", {"num_experts": 8, "top_k": 2, "hidden": 4096,
                                                   "intermediate": 14336, "heads": 32, "vocab_size": 32000}),
}


@dataclass(frozen=True)
class Routing:
    """A trace as tables: per MoE layer, [positions, top_k] expert ids and weights; the prompt's length."""

    model: str
    index: list[torch.Tensor]
    weights: list[torch.Tensor]
    prompt: int


def read_routing(path: str | Path, layers: int | None = None) -> Routing:
    """The first ``layers`` MoE layers of a trace (all by default). A trace without prefill (decode only)
    lends its first 8 tokens to the prompt."""
    from expertswap.engine import read_trace

    header, tokens = read_trace(path)
    kept = header.layers[:layers] if layers else header.layers
    index, weights = [], []
    for layer in kept:
        ids = torch.tensor([t.experts[layer] for t in tokens], dtype=torch.long)
        given = [t.weights.get(layer) for t in tokens]
        if all(w is not None and len(w) == header.top_k for w in given):
            w = torch.tensor(given, dtype=torch.float32)
        else:  # routing ids only (Granite's source): equal shares
            w = torch.full(ids.shape, 1.0 / header.top_k)
        index.append(ids)
        weights.append(w / w.sum(dim=1, keepdim=True))
    prefill = sum(t.phase == "prefill" for t in tokens)
    return Routing(header.model, index, weights, prefill or 8)


class TraceRouter(nn.Module):
    """Returns the trace's routing for the positions it is asked about, in the family router's shape:
    (logits, weights, index). Graph-capturable: the table and the position live on the device.

    A prompt's rows follow the router's own counter. A single decode token on the CUDA-graph step reads the
    step's own position (``clock``): the graphs' warm-up runs the pieces before capturing them, and a counter
    would count those runs too.
    """

    def __init__(self, index: torch.Tensor, weights: torch.Tensor, num_experts: int, device: torch.device,
                 clock: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.clock = clock
        self.register_buffer("table", index.to(device))
        self.register_buffer("shares", weights.to(device))
        self.register_buffer("position", torch.zeros((), dtype=torch.long, device=device))

    def _start(self, rows: int) -> torch.Tensor:
        if rows == 1 and self.clock is not None:
            self.position.copy_(self.clock.reshape(()))
        return self.position.clone()

    def _rows(self, start: torch.Tensor, rows: int) -> torch.Tensor:
        return (start + torch.arange(rows, device=self.table.device)) % self.table.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at = self._rows(self._start(x.shape[0]), x.shape[0])
        self.position += x.shape[0]
        logits = torch.zeros(x.shape[0], self.num_experts, device=x.device, dtype=x.dtype)
        return logits, self.shares[at].to(x.dtype), self.table[at]


def install(engine: Engine, routing: Routing) -> list[TraceRouter]:
    """Replace the router of every MoE layer of ``engine``'s compact step with the trace's (before any reply)."""
    compact = engine.compact
    if compact is None:
        raise SystemExit("trace replay needs a family the compact step covers (olmoe, qwen2_moe, qwen3_moe, mixtral)")
    blocks = [layer.mlp for layer in compact.layers if hasattr(layer.mlp, "experts")]
    if len(blocks) != len(routing.index):
        raise SystemExit(f"the model has {len(blocks)} MoE layers, the routing {len(routing.index)}")
    routers = []
    for block, index, weights in zip(blocks, routing.index, routing.weights, strict=True):
        router = TraceRouter(index, weights, block.experts.num_experts, compact.device,
                             engine.graphed.position if engine.graphed is not None else None)
        block.router = router
        routers.append(router)
    return routers


def build(model: str, layers: int) -> Path:
    """The synthetic stand-in for ``model`` at ``layers`` MoE layers, built once into the temporary folder."""
    from tools.synthetic import build_model

    family, shape = SHAPES[model]
    name = f"expertswap-trace-{family}-{shape['num_experts']}x{layers}-kv{shape.get('kv_heads', 0)}"
    folder = Path(tempfile.gettempdir()) / name
    if not (folder / "config.json").exists():
        build_model(family, folder, dtype=torch.bfloat16, init_std=0.02, layers=layers, **shape)
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = 16384  # room for the 8k-token prefill and a reply
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def run(folder: str, trace: str, layers: int, budget: str, device: str, repeats: int, replay: bool,
        prompts: tuple[int, ...] = ()) -> dict:
    """One engine in this process: greedy decode over the trace's tokens, ``repeats`` times, under the trace's
    routing (``replay``) or the model's own random routing, for as many tokens; then the prefill of a prompt
    of each length in ``prompts``."""
    from expertswap.engine import Engine
    from expertswap.protocol import SamplingSettings

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    routing = read_routing(trace, layers)
    engine = Engine.load(folder, budget=budget, device=device, dtype=dtype, ram_tier=device == "cuda")
    try:
        routers = install(engine, routing) if replay else []  # once: captured graphs keep reading these
        prompt, total = routing.prompt, routing.index[0].shape[0]
        cuda = device == "cuda"
        # the VRAM target's bound: what is not an expert, the budget, and the KV cache a reply of this length gets
        non_expert = torch.cuda.memory_allocated() - engine.resident_expert_bytes() if cuda else 0
        compact = engine.compact
        assert compact is not None
        kv = 2 * len(compact.layers) * compact.kv_shape[1] * cache_size(total) * compact.kv_shape[3] * \
            compact.dtype.itemsize
        speeds, outputs, hits, moved = [], [], [], []
        for _ in range(repeats):
            for router in routers:
                router.position.zero_()  # in place: the graphs' buffer, back to the trace's first token
            engine.forget_kept_caches()  # every repeat routes the whole prompt, as the first did
            tokens = engine.generate(list(range(3, 3 + prompt)), SamplingSettings(max_new_tokens=total - prompt))
            out = [next(tokens)]  # the prefill: its lookups are not the decode's
            before, loaded = engine.stats(), engine.runtime.counters.bytes_loaded
            out += list(tokens)
            after = engine.stats()
            moved.append((engine.runtime.counters.bytes_loaded - loaded) / max(len(out) - 1, 1))
            outputs.append(out)
            speeds.append(after.tokens_per_s)
            looked = (after.hits - before.hits) + (after.misses - before.misses)
            hits.append((after.hits - before.hits) / looked if looked else 1.0)
        peak = torch.cuda.max_memory_allocated() if cuda else 0  # before the bandwidth probe's buffers
        kernels, busy = profile_decode(engine, prompt) if cuda else (0.0, 0.0)
        prefill = {length: prefill_speed(engine, length, repeats) for length in prompts}
        return {"budget": budget, "pcie": pcie_bandwidth() if cuda else 0.0, "tok_s": statistics.median(speeds),
                "hit_rate": statistics.median(hits),
                "tokens": outputs[0], "stable": all(o == outputs[0] for o in outputs),
                "bytes_per_token": statistics.median(moved),
                "graphs": engine.graphed.graphs_per_token if engine.graphed is not None else 0,
                "kernels": kernels, "busy": busy, "peak_vram": peak, "prefill": prefill,
                "bound": non_expert + engine.budget_bytes + kv}
    finally:
        engine.close()


def profile_decode(engine: Engine, prompt: int, tokens: int = 16) -> tuple[float, float]:
    """Kernels per decode token and the GPU's busy share of the wall time, from CUPTI's kernel records over
    ``tokens`` decode tokens after the timed runs (the profiler's own cost included in the wall time)."""
    from torch.profiler import ProfilerActivity, profile

    from expertswap.protocol import SamplingSettings

    engine.forget_kept_caches()
    reply = engine.generate(list(range(3, 3 + prompt)), SamplingSettings(max_new_tokens=tokens + 1))
    next(reply)  # the prefill is not decode
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        decoded = sum(1 for _ in reply)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(str(Path(folder) / "trace.json"))
        events = json.loads((Path(folder) / "trace.json").read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    return len(kernels) / max(decoded, 1), sum(e["dur"] for e in kernels) / 1e6 / wall


def prefill_speed(engine: Engine, length: int, repeats: int) -> float:
    """Prompt tokens per second: a ``length``-token prompt to its first token, the median of ``repeats`` after
    one warm-up (which sizes the caches)."""
    from expertswap.protocol import SamplingSettings

    ids = [3 + i % 30000 for i in range(length)]
    times = []
    for _ in range(repeats + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        engine.forget_kept_caches()  # the whole prompt each time, not the last run's cache
        started = time.perf_counter()
        reply = engine.generate(ids, SamplingSettings(max_new_tokens=1))
        next(reply)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        list(reply)  # the rest of a one-token reply: its end
    return length / statistics.median(times[1:])


def pcie_bandwidth(size: int = 256 << 20) -> float:
    """Host-to-device bytes per second from pinned memory (the median of 5 copies of ``size`` bytes)."""
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return size / statistics.median(times)


def main(trace: Path, layers: int | None, budgets: list[str], device: str, repeats: int, out: Path,
         prompts: tuple[int, ...] = (), llama_cpp: Path | None = None,
         routings: tuple[str, ...] = ("trace", "random")) -> Path:
    """Every budget under each of ``routings`` (the trace's, the model's own random one), each in a fresh
    process (the trace-driven ones also time the prefill of ``prompts``), then llama.cpp of the tree
    ``llama_cpp`` on the same weights at equal VRAM; the tables go to ``out``, ExpertSwap's before llama.cpp
    starts."""
    if (prompts or llama_cpp) and "trace" not in routings:
        raise SystemExit("prefill and llama.cpp sit beside the trace's routing: keep it in --routing")
    routing = read_routing(trace, layers)
    depth = len(routing.index)
    folder = build(routing.model, depth)
    rows: dict[str, list[dict]] = {kind: [] for kind in routings}
    for kind in rows:
        for budget in budgets:
            lengths = prompts if kind == "trace" else ()
            code = ("import json, sys; from benchmarks.trace_routing import run; "
                    f"print(json.dumps(run({str(folder)!r}, {str(trace)!r}, {depth}, {budget!r}, {device!r}, "
                    f"{repeats}, {kind == 'trace'}, {lengths!r})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode:  # the child's own traceback, not only its exit status
                raise SystemExit(f"{kind} routing at {budget} failed:\n{done.stderr[-4000:]}")
            rows[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trace-decode-{trace.stem}-{device}.md"
    title = (f"# Decode under real routing: {trace.name} on a synthetic {routing.model} shape, {depth} MoE layers, "
             f"{device}")
    method = (f"Greedy, prompt {routing.prompt} tokens, {routing.index[0].shape[0] - routing.prompt} decoded, "
              f"medians of {repeats} in a fresh process per budget. `same as 100%`: the tokens equal this routing's "
              "own 100%. `peak / bound`: the peak over what is not an expert plus the budget plus the KV cache "
              "(the target: at most 1.10). `limit`: the tok/s that 100%'s time per token plus the bytes each token "
              "brought in, over the measured pinned host-to-device bandwidth, would allow; `x limit`: tok/s over it "
              "(the target: within 1.5x, so at least 0.67). `graphs`: CUDA graphs one token replays; `kernels`: "
              "kernels per decode token and `busy`: the GPU's busy share, from a profile of 16 more tokens.")
    pcie = max(r["pcie"] for runs in rows.values() for r in runs)
    bandwidth = f"Pinned host-to-device bandwidth: {pcie / 1e9:.1f} GB/s."
    lines = [title, "", stamp(device), "", method, "", bandwidth, "",
             ("| routing | budget | tok/s | decode hit rate | MiB in / token | limit tok/s | x limit | graphs | "
              "kernels | busy | same as 100% | peak VRAM GiB | peak / bound |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for kind, runs in rows.items():
        full = next((r for r in runs if r["budget"] == "100%"), runs[0])
        for r in runs:
            same = "yes" if r["tokens"] == full["tokens"] and r["stable"] else "NO"
            seconds = 1 / full["tok_s"] + (r["bytes_per_token"] / r["pcie"] if r["pcie"] else 0.0)
            lines.append(f"| {kind} | {r['budget']} | {r['tok_s']:.1f} | {r['hit_rate']:.3f} | "
                         f"{r['bytes_per_token'] / 2**20:.1f} | {1 / seconds:.1f} | {r['tok_s'] * seconds:.2f} | "
                         f"{r['graphs']} | {r['kernels']:.0f} | {r['busy']:.0%} | {same} | "
                         f"{r['peak_vram'] / 2**30:.2f} | {r['peak_vram'] / r['bound']:.2f} |")
    if prompts:
        lines += ["", f"Prefill under the trace's routing, tok/s (prompt to first token, median of {repeats}):", "",
                  "| prompt tokens | " + " | ".join(budgets) + " |", "| ---: |" + " ---: |" * len(budgets)]
        lines += [f"| {length} | " + " | ".join(f"{r['prefill'][str(length)]:,.0f}" for r in rows["trace"]) + " |"
                  for length in prompts]
    path.write_text("\n".join(lines) + "\n")
    if llama_cpp is not None:
        lines += ["", *beside_llama_cpp(llama_cpp, folder, depth, budgets, rows, prompts, repeats, out)]
        path.write_text("\n".join(lines) + "\n")
    return path


def beside_llama_cpp(source: Path, folder: Path, depth: int, budgets: list[str], rows: dict[str, list[dict]],
                     prompts: tuple[int, ...], repeats: int, out: Path) -> list[str]:
    """llama.cpp CUDA on the same weights (its own BF16 and Q8_0 conversions) with the experts of the layers
    a budget leaves out on the CPU (``--n-cpu-moe``), as a markdown section beside ``rows``; its raw JSON and
    logs go to ``out``. A llama.cpp failure is a row that says so: ExpertSwap's figures stand."""
    from .llama_cpp import bench_gpu, convert

    shares = [float(b.rstrip("%")) / 100 for b in budgets]
    cpu_layers = [round(depth * (1 - share)) for share in shares]
    lines = ["## llama.cpp CUDA beside it, same weights, same run", "",
             (f"llama.cpp from `{source.name}` (`build/bin/llama-bench`, the same sources' `convert_hf_to_gguf.py`), "
             f"`-ngl 99 -ncmoe {','.join(map(str, cpu_layers))} -t {os.cpu_count()}`: the experts of "
             f"{', '.join(map(str, cpu_layers))} of {depth} layers on the CPU, the same expert bytes on the GPU as "
             f"each budget; means of {repeats}. ExpertSwap: the table above (medians)."), "",
             "| contender | test | " + " | ".join(budgets) + " |", "| --- | --- |" + " ---: |" * len(budgets)]
    tests = [("decode", 0)] + [(f"prefill {p}", p) for p in prompts]
    ours = {"decode": {k: [r["tok_s"] for r in runs] for k, runs in rows.items()}}
    for name, length in tests[1:]:
        ours[name] = {"trace": [r["prefill"][str(length)] for r in rows["trace"]]}
    theirs: dict[str, dict[str, list[float]]] = {}
    for outtype in ("bf16", "q8_0"):
        label = f"llama.cpp {outtype.upper()}"
        try:
            gguf = convert(source, folder, outtype)
            results = bench_gpu(source / "build" / "bin" / "llama-bench", gguf, cpu_layers, list(prompts), 64,
                                repeats, out / f"llama-bench-{outtype}.log")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            lines.append(f"| {label} | failed: {str(error)[:160]} |" + " |" * len(budgets))
            continue
        (out / f"llama-bench-{folder.name}-{outtype}.json").write_text(json.dumps(results, indent=1))
        speed = {(r["n_cpu_moe"], r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in results}
        for name, length in tests:  # decode: tg64 from an empty cache; prefill: pp<length>
            theirs.setdefault(name, {})[label] = [speed.get((n, length, 0) if length else (n, 0, 64), float("nan"))
                                                  for n in cpu_layers]
    for name, _ in tests:
        for kind, speeds in ours[name].items():
            lines.append(f"| ExpertSwap, {kind} routing | {name} | " + " | ".join(f"{v:,.1f}" for v in speeds) + " |")
        for label, speeds in theirs.get(name, {}).items():
            lines.append(f"| {label} | {name} | " + " | ".join(f"{v:,.1f}" for v in speeds) + " |")
        bf16 = theirs.get(name, {}).get("llama.cpp BF16")
        if bf16:
            ratio = [o / t for o, t in zip(ours[name]["trace"], bf16, strict=True)]
            lines.append(f"| ExpertSwap trace / llama.cpp BF16 | {name} | " + " | ".join(f"{v:.2f}x" for v in ratio)
                         + " |")
    return lines
