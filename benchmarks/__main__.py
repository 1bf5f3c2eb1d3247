"""The benchmark harness: ``python -m benchmarks COMMAND ...`` (results in benchmarks/results).

Commands: speed, swap-copy, budget-latency, quality, default-model, core-sweep, exact-budgets, llama-cpp, prediction,
replay, record-traces, quantized, quantized-gpu, lowbit, fit-real, default-checkpoints, kernel-caches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    exact = sub.add_parser("exact-budgets", help="greedy tokens at every budget vs full residency, at full depth")
    exact.add_argument("--model", choices=["olmoe-shape", "qwen3-shape"], default="olmoe-shape")
    exact.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    exact.add_argument("--layers", type=int, default=16)
    exact.add_argument("--budgets", nargs="+", default=["100%", "75%", "50%", "25%"])
    exact.add_argument("--tokens", type=int, default=48)
    exact.add_argument("--repeats", type=int, default=3)
    prediction = sub.add_parser("prediction", help="the prefetch predictor's precision and recall on the default model")
    prediction.add_argument("--tokens", type=int, default=48)
    replay = sub.add_parser("replay", help="routing traces through the engine's residency code, against Belady")
    replay.add_argument("traces", nargs="+", help="trace files (JSON Lines, see README: Routing traces)")
    replay.add_argument("--budgets", nargs="+", default=["25%", "50%", "75%"])
    quantized = sub.add_parser("quantized", help="quantised experts on the default model: quality and speed")
    quantized.add_argument("--repeats", type=int, default=3)
    sub.add_parser("quantized-gpu", help="quantised experts on the GPU (OLMoE shapes): tokens/s per budget")
    sub.add_parser("lowbit", help="mixed precision for misses on the default model: quality cost and share")
    sub.add_parser("fit-real", help="real MoE models' sizes from their configs: what fits a laptop and a GPU")
    sub.add_parser("record-traces", help="record the committed routing traces (benchmarks/traces/)")
    caches = sub.add_parser("kernel-caches", help="resident set and speed with oneDNN's kernel caches capped or not")
    caches.add_argument("--repeats", type=int, default=3)
    args, rest = parser.parse_known_args(argv)
    if args.command == "speed":
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
    elif args.command == "swap-copy":
        from .swap_copy import main as run

        print(run(args.models).read_text())
    elif args.command == "budget-latency":
        from .budget_latency import main as run

        print(run(args.model, args.device).read_text())
    elif args.command == "quality":
        from .quality import main as run

        print(run().read_text())
    elif args.command == "llama-cpp":
        from .llama_cpp import main as run

        print(run(args.folder, args.gguf, args.llama_bench, args.tokens, args.repeats, args.budgets,
                  args.cap_mib).read_text())
    elif args.command == "exact-budgets":
        from .exact_budgets import main as run

        print(run(args.model, args.device, args.layers, args.budgets, args.tokens, args.repeats).read_text())
    elif args.command == "prediction":
        from .prediction import main as run

        run(args.tokens)
    elif args.command == "replay":
        from .replay import main as run

        for path in run(args.traces, args.budgets):
            print(path.read_text())
    elif args.command == "quantized":
        from .quantized import main as run

        print(run(args.repeats).read_text())
    elif args.command == "quantized-gpu":
        from .quantized_gpu import main as run

        print(run().read_text())
    elif args.command == "lowbit":
        from .lowbit import main as run

        print(run().read_text())
    elif args.command == "fit-real":
        from .fit_real import main as run

        print(run().read_text())
    elif args.command == "record-traces":
        from .record_traces import main as run

        for path in run():
            print(path)
    elif args.command == "kernel-caches":
        from .kernel_caches import main as run

        print(run(args.repeats).read_text())
    elif args.command == "default-model":
        from .default_model import main as run

        run()
    elif args.command == "default-checkpoints":
        from .default_checkpoints import main as run

        print(run(args.folders).read_text())
    else:
        from .core_sweep import main as run

        sys.argv = [sys.argv[0], *rest]
        run()


if __name__ == "__main__":
    main()
