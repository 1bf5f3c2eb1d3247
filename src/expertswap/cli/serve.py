"""``expertswap serve [load options] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-body-bytes N]
[--seed N]``: the engine behind an OpenAI-compatible API, loaded from the same options as ``expertswap-cli``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from expertswap.cli.options import add_load_options, load_engine
from expertswap.models import DEFAULT_MODEL
from expertswap.protocol import ExpertSwapError
from expertswap.server import MAX_BODY_BYTES, create_app, loopback


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The load options ``expertswap-cli`` takes, and where and for whom to listen."""
    p = argparse.ArgumentParser(prog="expertswap serve", description="An OpenAI-compatible API for one model.")
    add_load_options(p)
    p.add_argument("--host", default="127.0.0.1", help="another address than loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="required from clients as: Authorization: Bearer KEY; without "
                   "one, only requests to localhost from pages on localhost (Host, Origin) are answered")
    p.add_argument("--max-body-bytes", type=_positive, default=MAX_BODY_BYTES,
                   help=f"larger request bodies are refused with 413 (default: {MAX_BODY_BYTES})")
    p.add_argument("--seed", type=int, default=None, help="sample requests that set no seed from N, N+1, ... in "
                   "the order they come: a reproducible server (default: a fresh random seed each)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not loopback(args.host) and not args.api_key:
        print(f"expertswap serve: error: listening on {args.host} (not loopback) needs --api-key", file=sys.stderr)
        return 2
    import uvicorn

    try:
        engine = load_engine(args)
    except ExpertSwapError as exc:
        print(f"expertswap serve: error: {exc}", file=sys.stderr)
        return 2
    name = DEFAULT_MODEL if args.model == DEFAULT_MODEL else Path(args.model).name
    print(f"serving {name} at http://{args.host}:{args.port}/v1", flush=True)
    try:
        app = create_app(engine, name, args.api_key, max_body_bytes=args.max_body_bytes, seed=args.seed)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
