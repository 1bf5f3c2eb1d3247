"""The benchmark harness: ``python -m benchmarks COMMAND ...`` (results in benchmarks/results; replay writes
only where its --out says).

Commands: speed, swap-copy, budget-latency, quality, default-model, core-sweep, exact-budgets, llama-cpp, prediction,
replay, trace-decode, app-speed, chat-turns, record-traces, quantized, quantized-gpu, cpu-settings, lowbit, fit-real,
default-checkpoints, kernel-caches, grammar-mask.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed", help="tokens/s, latency and memory of every contender at 25-100%% budgets")
    speed.add_argument("--model", choices=["default", "olmoe-shape", "qwen3-shape"], default="default")
    speed.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    speed.add_argument("--tokens", type=int, default=32)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--budgets", nargs="+", default=["25%", "50%", "75%", "100%"])
    speed.add_argument("--contenders", nargs="+", default=[], help="e.g. exact lru accelerate (default: all)")
    copy = sub.add_parser("swap-copy", help="GPU swap copies against the measured pinned host-to-device bandwidth")
    copy.add_argument("models", nargs="*", default=["olmoe-shape", "qwen3-shape"])
    sub.add_parser("quality", help="perplexity and top-1 agreement per policy and budget (default model)")
    sub.add_parser("default-model", help="the default model's quality report")
    checkpoints = sub.add_parser("default-checkpoints", help="the default model's training checkpoints side by side")
    checkpoints.add_argument("folders", nargs="+", type=Path, help="shipped folders written by distill.py train")
    latency = sub.add_parser(
        "budget-latency", help="how fast a budget change applies mid-reply, and the stall it causes"
    )
    latency.add_argument("--model", choices=["default", "olmoe-shape", "qwen3-shape"], default="default")
    latency.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sub.add_parser("core-sweep", help="the engine's policy/budget sweep on a synthetic model")
    llama = sub.add_parser("llama-cpp", help="ExpertSwap and llama.cpp on the CPU, same weights, one run")
    llama.add_argument("--folder", required=True, help="the Hugging Face model folder")
    llama.add_argument("--gguf", nargs="+", required=True, help="its GGUF conversions (BF16, Q8_0, ...)")
    llama.add_argument("--llama-bench", required=True, help="path of a llama-bench binary")
    llama.add_argument("--tokens", type=int, default=64)
    llama.add_argument("--repeats", type=int, default=3)
    llama.add_argument("--budgets", nargs="+", default=["100%", "50%", "25%"])
    llama.add_argument("--cap-mib", type=int, default=None, help="run every contender under this memory cap")
    llama.add_argument("--quantize", nargs="*", default=[],
                       help="also ExpertSwap with its experts quantised so (KIND+dense: the other weights in int8 too)")
    llama.add_argument("--no-plain", action="store_true",
                       help="leave out plain transformers and ExpertSwap in the checkpoint's dtype (under a cap)")
    llama.add_argument("--name", default=None, help="the results file's name (default llama-cpp-cpu[-capN])")
    exact = sub.add_parser("exact-budgets", help="greedy tokens at every budget vs full residency, at full depth")
    exact.add_argument("--model", choices=["olmoe-shape", "qwen3-shape"], default="olmoe-shape")
    exact.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    exact.add_argument("--layers", type=int, default=16)
    exact.add_argument("--budgets", nargs="+", default=["100%", "75%", "50%", "25%"])
    exact.add_argument("--tokens", type=int, default=48)
    exact.add_argument("--repeats", type=int, default=3)
    prediction = sub.add_parser("prediction", help="a router-based prefetch predictor on the default model")
    prediction.add_argument("--tokens", type=int, default=48)
    replay = sub.add_parser("replay", help="routing traces through the engine's residency code, against Belady")
    replay.add_argument("traces", nargs="+", help="trace files (JSON Lines, see docs/traces.md)")
    replay.add_argument("--budgets", nargs="+", default=["25%", "50%", "75%"])
    replay.add_argument("--out", type=Path, default=None,
                        help="folder for the tables and plots (default: a new temporary folder; "
                             "benchmarks/results to refresh the committed ones)")
    app = sub.add_parser("app-speed", help="the desktop app's decode speed against the engine alone (offscreen)")
    app.add_argument("--model", type=Path, default=None, help="a model folder (default: a synthetic OLMoE)")
    app.add_argument("--budgets", nargs="+", default=["100%", "50%", "25%"])
    app.add_argument("--tokens", type=int, default=192)
    app.add_argument("--repeats", type=int, default=5)
    app.add_argument("--out", type=Path, required=True, help="folder for the table")
    turns = sub.add_parser("chat-turns", help="time to first token over a long chat, from the cache or not")
    turns.add_argument("--model", type=Path, default=None, help="a model folder (default: the built-in model)")
    turns.add_argument("--budget", default="50%")
    turns.add_argument("--turns", type=int, default=20)
    turns.add_argument("--tokens", type=int, default=48)
    turns.add_argument("--repeats", type=int, default=3)
    turns.add_argument("--out", type=Path, required=True, help="folder for the table")
    trace = sub.add_parser("trace-decode", help="decode speed and hit rate under a real model's routing (GPU)")
    trace.add_argument("trace", type=Path, help="a trace of a real model (../shared/traces style)")
    trace.add_argument("--layers", type=int, default=None, help="the first N MoE layers (default: all)")
    trace.add_argument("--budgets", nargs="+", default=["100%", "75%", "50%", "25%"])
    trace.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    trace.add_argument("--repeats", type=int, default=3)
    trace.add_argument("--out", type=Path, required=True, help="folder for the table")
    trace.add_argument("--prefill", type=int, nargs="*", default=[], help="also time prompts of these lengths")
    trace.add_argument("--llama-cpp", type=Path, default=None,
                       help="a llama.cpp source tree with build/bin/llama-bench: beside it on the same weights")
    trace.add_argument("--routing", nargs="+", choices=["trace", "random"], default=["trace", "random"],
                       help="the trace's routing, the model's own random routing (the best case), or both")
    quantized = sub.add_parser("quantized", help="quantised experts on the default model: quality and speed")
    quantized.add_argument("--repeats", type=int, default=3)
    quantized.add_argument("--kinds", nargs="+", default=None, help="bf16 and quantisations to run (all by default)")
    settings = sub.add_parser("cpu-settings", help="CPU decode per thread count, allocator and OpenMP wait policy")
    settings.add_argument("--folder", required=True, help="the model folder")
    settings.add_argument("--quantize", default=None, help="KIND or KIND+dense (--dense int8 beside it)")
    settings.add_argument("--budget", default="100%")
    settings.add_argument("--tokens", type=int, default=64)
    settings.add_argument("--repeats", type=int, default=3)
    settings.add_argument("--name", default=None, help="the results file's name (default cpu-settings-FOLDER)")
    sub.add_parser("quantized-gpu", help="quantised experts on the GPU (OLMoE shapes): tokens/s per budget")
    sub.add_parser("lowbit", help="mixed precision for misses on the default model: quality cost and share")
    sub.add_parser("fit-real", help="real MoE models' sizes from their configs: what fits a laptop and a GPU")
    sub.add_parser("record-traces", help="record the committed routing traces (benchmarks/traces/)")
    caches = sub.add_parser("kernel-caches", help="resident set and speed with oneDNN's kernel caches capped or not")
    caches.add_argument("--repeats", type=int, default=3)
    mask = sub.add_parser("grammar-mask", help="constrained decoding's mask per token: llguidance and xgrammar (CPU)")
    mask.add_argument("--out", type=Path, required=True, help="folder for the table")
    args, rest = parser.parse_known_args(argv)
    RUNS[args.command](args, rest)


def _speed(args: argparse.Namespace, _rest: list[str]) -> None:
    from tqdm import tqdm

    from .speed import sweep, write

    bar = tqdm(desc=f"speed {args.model}", unit="run")

    def progress(text: str, rows: list[dict]) -> None:  # the table so far survives an interrupted sweep
        bar.set_postfix_str(text)
        bar.update()
        write(rows, args.model, args.device, args.tokens, args.repeats)

    rows = sweep(args.model, args.device, args.tokens, args.repeats, tuple(args.budgets), progress,
                 tuple(args.contenders))
    bar.close()
    print(write(rows, args.model, args.device, args.tokens, args.repeats).read_text())


def _replay(args: argparse.Namespace, _rest: list[str]) -> None:
    import tempfile

    from .replay import main as run

    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="expertswap-replay-"))
    for path in run(args.traces, args.budgets, out):
        print(path.read_text())
        print(f"written: {path} and {path.with_suffix('.png')}")


def _record_traces(_args: argparse.Namespace, _rest: list[str]) -> None:
    from .record_traces import main as run

    for path in run():
        print(path)


def _prediction(args: argparse.Namespace, _rest: list[str]) -> None:
    from .prediction import main as run

    run(args.tokens)


def _default_model(_args: argparse.Namespace, _rest: list[str]) -> None:
    from .default_model import main as run

    run()


def _core_sweep(_args: argparse.Namespace, rest: list[str]) -> None:
    from .core_sweep import main as run

    sys.argv = [sys.argv[0], *rest]
    run()


def _printed(module: str, call: Callable[[Any, argparse.Namespace], Path]) -> Callable[[argparse.Namespace, list[str]],
                                                                                       None]:
    """A command whose ``main`` writes one results file, printed when done."""
    def run(args: argparse.Namespace, _rest: list[str]) -> None:
        print(call(importlib.import_module(f"benchmarks.{module}").main, args).read_text())

    return run


RUNS: dict[str, Callable[[argparse.Namespace, list[str]], None]] = {
    "speed": _speed,
    "swap-copy": _printed("swap_copy", lambda run, a: run(a.models)),
    "budget-latency": _printed("budget_latency", lambda run, a: run(a.model, a.device)),
    "quality": _printed("quality", lambda run, a: run()),
    "llama-cpp": _printed("llama_cpp", lambda run, a: run(a.folder, a.gguf, a.llama_bench, a.tokens, a.repeats,
                                                          a.budgets, a.cap_mib, a.quantize, not a.no_plain,
                                                          a.name)),
    "exact-budgets": _printed("exact_budgets", lambda run, a: run(a.model, a.device, a.layers, a.budgets, a.tokens,
                                                                  a.repeats)),
    "app-speed": _printed("app_speed", lambda run, a: run(a.model, a.budgets, a.tokens, a.repeats, a.out)),
    "chat-turns": _printed("chat_turns", lambda run, a: run(a.model, a.budget, a.turns, a.tokens, a.repeats, a.out)),
    "prediction": _prediction,
    "replay": _replay,
    "trace-decode": _printed("trace_routing", lambda run, a: run(a.trace, a.layers, a.budgets, a.device, a.repeats,
                                                                 a.out, tuple(a.prefill), a.llama_cpp,
                                                                 tuple(a.routing))),
    "quantized": _printed("quantized", lambda run, a: run(a.repeats, a.kinds)),
    "cpu-settings": _printed("cpu_settings", lambda run, a: run(a.folder, a.quantize, a.budget, a.tokens, a.repeats,
                                                               a.name)),
    "quantized-gpu": _printed("quantized_gpu", lambda run, a: run()),
    "lowbit": _printed("lowbit", lambda run, a: run()),
    "fit-real": _printed("fit_real", lambda run, a: run()),
    "record-traces": _record_traces,
    "kernel-caches": _printed("kernel_caches", lambda run, a: run(a.repeats)),
    "grammar-mask": _printed("grammar_mask", lambda run, a: run(a.out)),
    "default-model": _default_model,
    "default-checkpoints": _printed("default_checkpoints", lambda run, a: run(a.folders)),
    "core-sweep": _core_sweep,
}


if __name__ == "__main__":
    main()
