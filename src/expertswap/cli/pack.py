"""``expertswap-cli pack``: write a model's packed experts now, in the foreground, with a progress bar.

With ``--quantize`` every front end writes them in the background anyway (misses then read packed bytes); this
does it at once, for a model about to be used under a tight memory cap. It resumes where a stopped run left off.
"""

from __future__ import annotations

import argparse
import sys

from expertswap.cli.options import add_load_options, load_engine
from expertswap.models import fit_report, resolve_model
from expertswap.protocol import PackProgress, SettingsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.quantize is None:
        raise SettingsError("pack writes quantised experts: give --quantize (int8, int4, ...)")
    budget = args.budget  # the experts are read for the file, not kept: the smallest committee does, by default
    if budget is None:
        budget = f"{fit_report(resolve_model(args.model), '100%', quantize=args.quantize).minimum_budget_bytes}B"
    with load_engine(args, budget=budget) as engine:
        packer = engine.packer
        assert packer is not None  # load_engine gives a pack root, and --quantize is set
        _show(packer.progress())
        while not packer.wait(timeout=0.2) and packer.writing:
            _show(packer.progress())
        _show(packer.progress())
        print(file=sys.stderr)
        if packer.done < packer.layers:
            print(f"expertswap-cli: error: {packer.error or 'packing stopped'}", file=sys.stderr)
            return 1
        print(f"packed experts in {packer.folder}", file=sys.stderr)
    return 0


def _show(progress: PackProgress) -> None:
    filled = 30 * progress.layers_done // max(progress.layers, 1)
    print(f"\rpacking {'#' * filled}{'.' * (30 - filled)} {progress.layers_done}/{progress.layers} layers",
          end="", file=sys.stderr, flush=True)
