"""``expertswap-cli generate``: one greedy reply to a prompt, streamed, or as one JSON object with the run's
stats (``--json``) for scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from pathlib import Path
from typing import TextIO

from expertswap.cli.options import add_load_options, load_engine
from expertswap.cli.reply import finish_reason
from expertswap.engine import IncrementalDecoder, reply_limit
from expertswap.protocol import ExpertSwapError, PromptError, SamplingSettings, Subscription


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options and generate's own; ``run`` is what the parsed arguments are run with."""
    add_load_options(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object with the reply and stats")
    parser.add_argument("--budget-schedule", type=parse_schedule, default=[],
                        help='change the budget at generated-token counts, e.g. "0:100%%,8:30%%,16:80%%"')
    parser.add_argument("--events", type=Path, help="write every telemetry event to this file as JSON lines")
    parser.add_argument("--trace", type=Path, help="write the routing trace (every token's experts per layer) here")
    parser.set_defaults(run=run)


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """ "0:100%,8:30%" -> [(0, "100%"), (8, "30%")], sorted by token count."""
    steps = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        count, sep, budget = part.partition(":")
        if not sep or not count.strip().isdigit() or not budget.strip():
            raise argparse.ArgumentTypeError(f"bad schedule entry {part!r}: use TOKENS:BUDGET, e.g. 8:30%")
        steps.append((int(count), budget.strip()))
    return sorted(steps)


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


def run(args: argparse.Namespace) -> int:
    schedule = list(args.budget_schedule)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)  # bad values fail before the load
    if not args.prompt:
        raise PromptError("the prompt is empty: there is nothing to reply to")
    events = _open_events(args.events)
    try:
        engine = load_engine(args, schedule[0][1] if schedule and schedule[0][0] == 0 else None)
    except BaseException:
        if events is not None:
            events.close()
        raise
    writer_stop = threading.Event()
    writer = None
    if events is not None:
        subscription = engine.subscribe(every_token=True)  # the committees as they start come first
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
    finish = finish_reason(len(tokens), limit, settings.max_new_tokens, engine.context_tokens)
    if args.json:
        stats = engine.stats()
        print(json.dumps({
            "text": engine.decode(tokens),
            "token_ids": tokens,
            "finish_reason": finish,
            "budget_bytes": stats.budget_bytes,
            "total_expert_bytes": stats.total_expert_bytes,
            "peak_resident_expert_bytes": stats.peak_resident_expert_bytes,
            "expert_loads": stats.expert_loads,
            "hits": stats.hits,
            "misses": stats.misses,
            "peak_rss_bytes": stats.peak_rss_bytes,
            "tokens_per_s": stats.tokens_per_s,
        }))
    return 0
