"""``expertswap serve --model DIR|default --budget 50% [--host 127.0.0.1] [--port 8000] [--api-key KEY]
[--max-body-bytes N]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from expertswap.engine import Engine, default_device
from expertswap.models import DEFAULT_BUDGET_RULE, DEFAULT_MODEL, default_budget, resolve_model
from expertswap.protocol import POLICIES, QUANTIZATIONS, ExpertSwapError
from expertswap.server import MAX_BODY_BYTES, create_app, loopback


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertswap serve", description="An OpenAI-compatible API for one model.")
    p.add_argument("--model", default=DEFAULT_MODEL, help='model folder, or "default" (the built-in model)')
    p.add_argument("--budget", help='expert memory: "50%", "300MiB"; default: the model\'s own '
                   f"({DEFAULT_BUDGET_RULE})".replace("%", "%%"))
    p.add_argument("--policy", choices=POLICIES, default=POLICIES[0])
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--host", default="127.0.0.1", help="another address than loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="required from clients as: Authorization: Bearer KEY; without "
                   "one, only requests to localhost from pages on localhost (Host, Origin) are answered")
    p.add_argument("--max-body-bytes", type=_positive, default=MAX_BODY_BYTES,
                   help=f"larger request bodies are refused with 413 (default: {MAX_BODY_BYTES})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not loopback(args.host) and not args.api_key:
        print(f"expertswap serve: error: listening on {args.host} (not loopback) needs --api-key", file=sys.stderr)
        return 2
    import uvicorn

    try:
        folder = resolve_model(args.model)
        engine = Engine.load(folder, budget=args.budget or default_budget(args.model),
                             device=args.device or default_device(), policy=args.policy, quantize=args.quantize)
    except ExpertSwapError as exc:
        print(f"expertswap serve: error: {exc}", file=sys.stderr)
        return 2
    name = DEFAULT_MODEL if args.model == DEFAULT_MODEL else Path(args.model).name
    print(f"serving {name} at http://{args.host}:{args.port}/v1", flush=True)
    try:
        app = create_app(engine, name, args.api_key, max_body_bytes=args.max_body_bytes)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
