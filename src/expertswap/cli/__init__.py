"""expertswap-cli: generate from a prompt (scriptable, --json) or chat in the terminal."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from expertswap.engine import Engine, IncrementalDecoder, dropped_notice, fit_history, reply_limit
from expertswap.models import DEFAULT_BUDGET_RULE, DEFAULT_MODEL, default_budget, resolve_model
from expertswap.protocol import (
    DEFAULT_EVICTION,
    EVICTIONS,
    POLICIES,
    QUANTIZATIONS,
    ExpertSwapError,
    PromptError,
    SamplingSettings,
    Subscription,
)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help='local model folder (config.json + safetensors), or "default" (the built-in model)')
    parser.add_argument(
        "--budget", help='expert memory: bytes with a unit ("300MiB", "1.5GB") or "50%"; default: the model\'s own '
        f"({DEFAULT_BUDGET_RULE})".replace("%", "%%")
    )
    parser.add_argument("--policy", choices=POLICIES, default="exact", help="what a missing expert does")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="quantise the experts when read: more of them per byte, but no longer the original model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-threshold", type=float, default=0.0,
                        help="policy skip: drop routings whose weight is below this (0 = drop none)")
    parser.add_argument("--ram-tier", action="store_true", help="keep every expert in host RAM (faster swaps)")
    parser.add_argument("--no-swapper", action="store_true",
                        help="no background swapping, misses only (on the CPU exact and skip only grow in it)")
    parser.add_argument("--eviction", choices=EVICTIONS, default=DEFAULT_EVICTION,
                        help="which expert a miss replaces: least important, or least recently used (baseline)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertswap-cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy reply to one prompt")
    _add_load_options(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, required=True)
    gen.add_argument("--json", action="store_true", help="print one JSON object with the reply and stats")
    gen.add_argument("--budget-schedule", type=parse_schedule, default=[],
                     help='change the budget at generated-token counts, e.g. "0:100%%,8:30%%,16:80%%"')
    gen.add_argument("--events", type=Path, help="write every telemetry event to this file as JSON lines")
    gen.add_argument("--trace", type=Path, help="write the routing trace (every token's experts per layer) here")
    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    _add_load_options(chat)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this share of probability")
    chat.add_argument("--system", default=None, help="system prompt")
    return parser


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """ "0:100%,8:30%" -> [(0, "100%"), (8, "30%")], sorted by token count."""
    steps = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        count, sep, budget = part.partition(":")
        if not sep or not count.strip().isdigit() or not budget.strip():
            raise argparse.ArgumentTypeError(f"bad schedule entry {part!r}: use TOKENS:BUDGET, e.g. 8:30%")
        steps.append((int(count), budget.strip()))
    return sorted(steps)


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


def _load(args: argparse.Namespace, budget: str | None = None) -> Engine:
    folder = resolve_model(args.model, _BuildBar())
    return Engine.load(folder, budget=budget or args.budget or default_budget(args.model), device=args.device,
                       policy=args.policy, ram_tier=args.ram_tier, skip_threshold=args.skip_threshold,
                       swapper=not args.no_swapper, eviction=args.eviction, quantize=args.quantize)


def _open_events(path: Path | None) -> TextIO | None:
    """Open the events file before anything is loaded, so an unwritable path fails at once, in words."""
    if path is None:
        return None
    try:
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise ExpertSwapError(f"cannot write events to {path}: {exc.strerror or exc}") from None


def _write_events(subscription: Subscription, fh: TextIO, stop: threading.Event) -> None:
    """Write events as JSON lines until ``stop`` is set and nothing is left to write."""
    with fh:
        while True:
            event = subscription.get(timeout=0.05)
            if event is not None:
                fh.write(json.dumps(event.to_json()) + "\n")
            elif stop.is_set():
                return


def _generate(args: argparse.Namespace) -> int:
    schedule = list(args.budget_schedule)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)  # bad values fail before the load
    if not args.prompt:
        raise PromptError("the prompt is empty: there is nothing to reply to")
    events = _open_events(args.events)
    try:
        engine = _load(args, schedule[0][1] if schedule and schedule[0][0] == 0 else None)
    except BaseException:
        if events is not None:
            events.close()
        raise
    writer_stop = threading.Event()
    writer = None
    if events is not None:
        subscription = engine.subscribe()
        engine.telemetry.emit(engine.residency())
        writer = threading.Thread(target=_write_events, args=(subscription, events, writer_stop))
        writer.start()
    pending = [(n, b) for n, b in schedule if n > 0]
    tokens = []
    decoder = IncrementalDecoder(engine.tokenizer)
    try:
        if args.chat:
            ids = engine.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            ids = engine.encode(args.prompt)
        limit = reply_limit(len(ids), engine.context_tokens, settings.max_new_tokens)  # the engine stops there
        with engine.record_trace(args.trace, Path(args.model).name) if args.trace else contextlib.nullcontext():
            for token in engine.generate(ids, settings):
                tokens.append(token)
                while pending and pending[0][0] <= len(tokens):
                    engine.set_budget(pending.pop(0)[1])
                if not args.json:
                    print(decoder.push(token), end="", flush=True)
    finally:
        engine.close()
        writer_stop.set()
        if writer is not None:
            writer.join()
    if not args.json:
        print()  # ends the streamed reply's line, before any note on stderr
    finish = _finish(len(tokens), limit, settings.max_new_tokens, engine.context_tokens)
    if args.json:
        stats = engine.stats()
        print(json.dumps({
            "text": engine.decode(tokens),
            "token_ids": tokens,
            "finish_reason": finish,
            "budget_bytes": stats.budget_bytes,
            "total_expert_bytes": stats.total_expert_bytes,
            "resident_expert_bytes": stats.peak_resident_expert_bytes,
            "expert_loads": stats.expert_loads,
            "hits": stats.hits,
            "misses": stats.misses,
            "peak_rss_bytes": stats.peak_rss_bytes,
            "tokens_per_s": stats.tokens_per_s,
        }))
    return 0


def _chat(args: argparse.Namespace) -> int:
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte becomes one refused line, not a crash
    engine = _load(args)
    try:
        _converse(engine, settings, [{"role": "system", "content": args.system}] if args.system else [])
    finally:
        engine.close()
    return 0


def _converse(engine: Engine, settings: SamplingSettings, messages: list[dict[str, str]]) -> None:
    """Read lines until an empty one or EOF; the oldest turns leave the history once it outgrows the context."""
    context = engine.context_tokens
    print(f"{engine.family.name} model, {len(engine.committees)} MoE layers. Empty line or Ctrl+D quits.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        try:
            fitted = fit_history([*messages, {"role": "user", "content": line}], engine.encode_chat, context,
                                 settings.max_new_tokens)
        except PromptError as exc:
            print(f"expertswap-cli: {exc}; that line was not sent", file=sys.stderr)
            continue
        limit = reply_limit(len(fitted.ids), context, settings.max_new_tokens)  # a line that fills it alone: exit 2
        if fitted.dropped:
            print(f"expertswap-cli: {dropped_notice(fitted.dropped, context)}", file=sys.stderr)
        tokens = []
        decoder = IncrementalDecoder(engine.tokenizer)
        print("bot> ", end="", flush=True)
        try:
            for token in engine.generate(fitted.ids, settings):
                tokens.append(token)
                print(decoder.push(token), end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        _finish(len(tokens), limit, settings.max_new_tokens, context)
        messages = [*fitted.messages, {"role": "assistant", "content": engine.decode(tokens)}]
        s = engine.stats()
        print(f"   [{s.tokens_per_s:.1f} tok/s, hit rate {s.hit_rate:.0%}, {s.expert_loads} expert loads]")


def _finish(generated: int, limit: int, wanted: int, context: int | None) -> str:
    """Why a reply ended ("stop": the model ended it, "length": the token limit, "context": the context is full);
    the last is said on stderr, since the reply is shorter than asked for."""
    if generated < limit:
        return "stop"
    if limit == wanted:
        return "length"
    print(f"expertswap-cli: the reply stopped at the {context}-token context after {generated} of {wanted} new "
          "tokens", file=sys.stderr)
    return "context"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return _generate(args) if args.command == "generate" else _chat(args)
    except ExpertSwapError as exc:
        print(f"expertswap-cli: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("expertswap-cli: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
