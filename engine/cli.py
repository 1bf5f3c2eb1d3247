"""expertswap-cli: generate from a prompt (scriptable, --json) or chat in the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .committee import POLICIES
from .engine import Engine
from .errors import ExpertSwapError
from .generation import IncrementalDecoder, SamplingSettings


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model folder (config.json + safetensors)")
    parser.add_argument("--budget", default="100%", help='expert memory: bytes with a unit ("300MiB", "1.5GB") or "50%%"')
    parser.add_argument("--policy", choices=POLICIES, default="exact", help="what a missing expert does")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--ram-tier", action="store_true", help="keep every expert in host RAM (faster swaps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertswap-cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy reply to one prompt")
    _add_load_options(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, required=True)
    gen.add_argument("--json", action="store_true", help="print one JSON object with the reply and stats")
    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    _add_load_options(chat)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--system", default=None, help="system prompt")
    return parser


def _generate(args: argparse.Namespace) -> int:
    engine = Engine.load(args.model, budget=args.budget, device=args.device, policy=args.policy,
                         ram_tier=args.ram_tier)
    if args.chat:
        ids = engine.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = engine.encode(args.prompt)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    tokens = []
    decoder = IncrementalDecoder(engine.tokenizer)
    for token in engine.generate(ids, settings):
        tokens.append(token)
        if not args.json:
            print(decoder.push(token), end="", flush=True)
    text = engine.decode(tokens)
    stats = engine.stats()
    if args.json:
        print(json.dumps({
            "text": text,
            "token_ids": tokens,
            "budget_bytes": stats.budget_bytes,
            "total_expert_bytes": stats.total_expert_bytes,
            "resident_expert_bytes": stats.peak_resident_expert_bytes,
            "expert_loads": stats.expert_loads,
            "hits": stats.hits,
            "misses": stats.misses,
            "peak_rss_bytes": stats.peak_rss_bytes,
            "tokens_per_s": stats.tokens_per_s,
        }))
    else:
        print()
    engine.close()
    return 0


def _chat(args: argparse.Namespace) -> int:
    engine = Engine.load(args.model, budget=args.budget, device=args.device, policy=args.policy,
                         ram_tier=args.ram_tier)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(f"{engine.family.name} model, {len(engine.committees)} MoE layers. Empty line or Ctrl+D quits.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        tokens = []
        decoder = IncrementalDecoder(engine.tokenizer)
        print("bot> ", end="", flush=True)
        try:
            for token in engine.generate(engine.encode_chat(messages), settings):
                tokens.append(token)
                print(decoder.push(token), end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        messages.append({"role": "assistant", "content": engine.decode(tokens)})
        s = engine.stats()
        print(f"   [{s.tokens_per_s:.1f} tok/s, hit rate {s.hit_rate:.0%}, {s.expert_loads} expert loads]")
    engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return _generate(args) if args.command == "generate" else _chat(args)
    except ExpertSwapError as exc:
        print(f"expertswap-cli: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
