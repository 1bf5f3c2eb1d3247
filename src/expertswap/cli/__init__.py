"""expertswap-cli: generate from a prompt (scriptable, --json) or chat in the terminal."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from expertswap.cli import chat, generate, pack
from expertswap.protocol import ExpertSwapError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertswap-cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_arguments(sub.add_parser("generate", help="greedy reply to one prompt"))
    chat.add_arguments(sub.add_parser("chat", help="interactive chat in the terminal"))
    pack.add_arguments(sub.add_parser("pack", help="write the packed expert file of --quantize now"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a typed error is one line on stderr and exit status 2, Ctrl+C exit status 130."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except ExpertSwapError as exc:
        print(f"expertswap-cli: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("expertswap-cli: interrupted", file=sys.stderr)
        return 130
