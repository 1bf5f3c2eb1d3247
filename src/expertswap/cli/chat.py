"""``expertswap-cli chat``: a conversation in the terminal, kept within the model's context."""

from __future__ import annotations

import argparse
import sys

from expertswap.cli.options import add_load_options, load_engine
from expertswap.cli.reply import finish_reason
from expertswap.engine import Engine, IncrementalDecoder, dropped_notice, fit_history, reply_limit
from expertswap.protocol import CHAT_SAMPLING, PromptError, SamplingSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options and chat's own; ``run`` is what the parsed arguments are run with."""
    add_load_options(parser)
    chat = CHAT_SAMPLING
    parser.add_argument("--max-new-tokens", type=int, default=chat.max_new_tokens,
                        help="a reply's cap (the context ends it sooner)")
    parser.add_argument("--temperature", type=float, default=chat.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=chat.top_p,
                        help="nucleus sampling: keep this share of probability")
    parser.add_argument("--repetition-penalty", type=float, default=chat.repetition_penalty,
                        help="above 1 pushes down the last 64 tokens (1 = none)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte becomes one refused line, not a crash
    engine = load_engine(args)
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
        finish_reason(len(tokens), limit, settings.max_new_tokens, context)
        messages = [*fitted.messages, {"role": "assistant", "content": engine.decode(tokens)}]
        s = engine.stats()
        print(f"   [{s.tokens_per_s:.1f} tok/s, first token {s.time_to_first_token_s:.2f} s, "
              f"{s.cached_prompt_tokens} of {s.prompt_tokens} prompt tokens from the last turn's cache, "
              f"hit rate {s.hit_rate:.0%}, {s.expert_loads} expert loads]")
