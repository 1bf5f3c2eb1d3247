"""Time to first token over a long chat: each turn from the cache the last one left, against the whole history
read again (what every turn did before prefix reuse).

    python -m benchmarks chat-turns [--model FOLDER] [--budget 50%] [--turns 20] [--tokens 48] [--repeats 3] --out DIR

One process per run, the two contenders round-robin. A run is a chat of ``turns`` scripted questions on the
built-in model, greedy, the history fitted to the context as the CLI's ``chat`` and the app fit it; each turn's
time to first token is the engine's own (``stats()``). "whole history" drops every kept cache before each turn.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from .stamp import stamp

QUESTIONS = [
    "What is a tuple in Python?", "How is it different from a list?", "When would I pick one over the other?",
    "Show me how to unpack one.", "What does a dictionary do?", "How do I loop over its keys?",
    "And over its values?", "What is a set good for?", "How do I remove duplicates from a list?",
    "Does that keep the order?", "What is a generator?", "Why is it lazy?", "How do I read a file line by line?",
    "What does the with statement do?", "How do I write a small class?", "What is inheritance?",
    "Name three built-in functions.", "What does enumerate return?", "How do I sort by a key?",
    "Summarise what we covered.",
]


def chat(folder: str, budget: str, turns: int, tokens: int, reuse: bool) -> list[dict[str, float]]:
    """Per turn of one chat in this process: prompt tokens, those from the cache, time to first token (s)."""
    from expertswap.engine import Engine
    from expertswap.engine.decode.history import fit_history
    from expertswap.protocol import SamplingSettings

    settings = SamplingSettings(max_new_tokens=tokens)
    rows = []
    with Engine.load(folder, budget=budget) as engine:
        messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        for question in (QUESTIONS * (turns // len(QUESTIONS) + 1))[:turns]:
            fitted = fit_history([*messages, {"role": "user", "content": question}], engine.encode_chat,
                                 engine.context_tokens, tokens)
            if not reuse:
                engine.forget_kept_caches()
            reply = list(engine.generate(fitted.ids, settings))
            stats = engine.stats()
            rows.append({"prompt": stats.prompt_tokens, "cached": stats.cached_prompt_tokens,
                         "ttft": stats.time_to_first_token_s})
            messages = [*fitted.messages, {"role": "assistant", "content": engine.decode(reply)}]
    return rows


def main(folder: Path | None, budget: str, turns: int, tokens: int, repeats: int, out: Path) -> Path:
    """``repeats`` chats per contender, each in a fresh process, round-robin; the table goes to ``out``."""
    default = folder is None
    if folder is None:
        from expertswap.models.default_model import resolve_model

        folder = resolve_model("default")
    runs: dict[bool, list[list[dict[str, float]]]] = {True: [], False: []}
    for _ in range(repeats):
        for reuse in (True, False):
            code = ("import json; from benchmarks.chat_turns import chat; "
                    f"print(json.dumps(chat({str(folder)!r}, {budget!r}, {turns}, {tokens}, {reuse})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  timeout=1800)
            runs[reuse].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median(reuse: bool, turn: int, key: str) -> float:
        return statistics.median(run[turn][key] for run in runs[reuse])

    def mean_ttft(reuse: bool, first: int, last: int) -> float:
        return statistics.mean(median(reuse, t - 1, "ttft") for t in range(first, last + 1))

    name = "the built-in model" if default else folder.name
    lines = [f"# Time to first token over a {turns}-turn chat, {name} at {budget}", "",
             (f"{stamp()}. Greedy, {tokens} new tokens a turn, medians of {repeats} fresh processes per contender, "
              "round-robin; the history fitted to the context as `chat` and the app fit it. Written by "
              "`python -m benchmarks chat-turns`."), "",
             "| turn | prompt tokens | from the cache | TTFT, from the cache (ms) | TTFT, whole history (ms) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for turn in range(turns):
        lines.append(f"| {turn + 1} | {median(True, turn, 'prompt'):.0f} | {median(True, turn, 'cached'):.0f} | "
                     f"{1000 * median(True, turn, 'ttft'):.0f} | {1000 * median(False, turn, 'ttft'):.0f} |")
    if turns >= 12:
        early, late = mean_ttft(True, 1, 3), mean_ttft(True, 10, 12)
        before = mean_ttft(False, 10, 12) / mean_ttft(False, 1, 3)
        verdict = "met" if late <= 1.5 * early else "not met"
        lines += ["", (f"Mean TTFT of turns 10-12 over turns 1-3: {late / early:.2f}x from the cache, {before:.2f}x "
                       f"reading the whole history. Target (issue 31): at most 1.5x: **{verdict}**.")]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chat-turns-default-cpu.md"
    path.write_text("\n".join(lines) + "\n")
    return path
