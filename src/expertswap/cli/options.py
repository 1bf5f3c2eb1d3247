"""The load options both command lines take (``expertswap-cli generate|chat`` and ``expertswap serve``), and the
engine they load: one set, so the two cannot drift apart (they once had different default devices)."""

from __future__ import annotations

import argparse
import sys

from expertswap.engine import Engine, default_device
from expertswap.models import DEFAULT_BUDGET_RULE, DEFAULT_MODEL, cache_root, default_budget, resolve_model
from expertswap.protocol import DEFAULT_EVICTION, EVICTIONS, POLICIES, QUANTIZATIONS


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """What model to load, with which budget, where, and how a missing expert is handled."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help='local model folder (config.json + safetensors), or "default" (the built-in model)')
    parser.add_argument(
        "--budget", help='expert memory: bytes with a unit ("300MiB", "1.5GB") or "50%"; default: the model\'s own '
        f"({DEFAULT_BUDGET_RULE})".replace("%", "%%")
    )
    parser.add_argument("--policy", choices=POLICIES, default=POLICIES[0], help="what a missing expert does")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="quantise the experts when read: more of them per byte, but no longer the original model")
    parser.add_argument("--dense", choices=("int8",), default=None,
                        help="with --quantize, on the CPU: int8 for the weights outside the experts too (attention, "
                        "dense MLPs, the output layer), as llama.cpp's Q8_0")
    parser.add_argument("--device", default=default_device(),
                        help="cpu or cuda (default: %(default)s, cuda where torch sees a GPU)")
    parser.add_argument("--skip-threshold", type=float, default=0.0,
                        help="policy skip: drop routings whose weight is below this (0 = drop none)")
    parser.add_argument("--ram-tier", action="store_true",
                        help="keep every expert in host RAM (faster swaps; on CUDA the host-free decode step)")
    parser.add_argument("--no-swapper", action="store_true",
                        help="no background swapping, misses only (under exact and skip it only fills empty slots)")
    parser.add_argument("--eviction", choices=EVICTIONS, default=DEFAULT_EVICTION,
                        help="which expert a miss replaces: least important, or least recently used (baseline)")


class _BuildBar:
    """A one-line text progress bar on stderr while the default model is built (redrawn on change only)."""

    def __init__(self) -> None:
        self.shown = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "checking":
            return
        filled = int(30 * done / max(total, 1))
        bar = f"\rbuilding the default model: {stage:<12} [{'#' * filled}{'.' * (30 - filled)}]"
        if bar != self.shown:
            self.shown = bar
            print(bar, end="\n" if stage == "writing" and done == total else "", file=sys.stderr, flush=True)


def load_engine(args: argparse.Namespace, budget: str | None = None) -> Engine:
    """The engine the load options ask for; ``budget`` (where a budget schedule starts) wins over ``--budget``."""
    folder = resolve_model(args.model, _BuildBar())
    return Engine.load(folder, budget=budget or args.budget or default_budget(args.model), device=args.device,
                       policy=args.policy, ram_tier=args.ram_tier, skip_threshold=args.skip_threshold,
                       swapper=not args.no_swapper, eviction=args.eviction, quantize=args.quantize,
                       dense=args.dense, pack_root=cache_root() / "packed")
