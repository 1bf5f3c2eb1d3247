"""How fast a budget change takes effect mid-reply, and what it costs the token stream.

A second thread (as the GUI's slider would) calls ``set_budget`` when the reply reaches token 16
(shrink to 25%) and token 40 (grow back to 100%). Measured: request -> applied (BudgetChange events),
request -> committee at its new size (resident expert bytes, polled every millisecond), and the stall:
the latency of the token that absorbs the change against the median token.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from pathlib import Path

from expertswap.engine import Engine
from expertswap.protocol import BudgetChange, SamplingSettings

from .contenders import run_dtype
from .speed import describe, model_folder
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
CHANGES = ((16, "25%"), (40, "100%"))
PROMPT = [{"role": "user", "content": "Tell me about the history of the Python programming language."}]


def one_run(folder: Path, device: str) -> list[dict]:
    engine = Engine.load(folder, budget="100%", device=device, dtype=run_dtype(device), ram_tier=device == "cuda")
    events = engine.subscribe()
    reached = {n: threading.Event() for n, _ in CHANGES}
    found: list[dict] = []

    def slider() -> None:
        for at, budget in CHANGES:
            reached[at].wait()
            start = time.monotonic()
            target = engine.set_budget(budget)
            while engine.resident_expert_bytes() != target and time.monotonic() - start < 10:
                time.sleep(0.001)
            found.append({"at": at, "budget": budget, "start": start, "sized": time.monotonic() - start})

    thread = threading.Thread(target=slider)
    thread.start()
    stamps = [time.monotonic()]
    for count, _ in enumerate(engine.generate(engine.encode_chat(PROMPT), SamplingSettings(max_new_tokens=64)), 1):
        stamps.append(time.monotonic())
        if count in reached:
            reached[count].set()
    thread.join()
    applied = [e for e in events.drain() if isinstance(e, BudgetChange) and e.applied]
    engine.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps[1:])]
    typical = statistics.median(gaps)
    for change in found:
        done = next(e for e in applied if e.t >= change["start"])
        after = next(i for i, t in enumerate(stamps) if t > change["start"])  # the first token after the request
        change |= {
            "applied": done.t - change["start"],
            "tokens_until_applied": sum(change["start"] < t < done.t for t in stamps),
            "stall": (stamps[after] - stamps[after - 1]) - typical,
            "typical": typical,
        }
    return found


def main(model: str, device: str, repeats: int = 3) -> Path:
    runs = [one_run(model_folder(model, device), device) for _ in range(repeats)]
    lines = [
        f"# Budget change latency mid-reply ({model}, {device}, {str(run_dtype(device)).removeprefix('torch.')})",
        "",
        f"Model: {describe(model, device)}.",
        "",
        (f"{stamp(device)}; medians of {repeats} replies. Written by `python -m benchmarks budget-latency`."),
        "",
        (
            "| change | request -> applied (ms) | tokens generated meanwhile | request -> committee at new size (ms) | "
            "stall of the next token (ms) | median token (ms) |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (at, budget) in enumerate(CHANGES):
        rows = [run[i] for run in runs]
        med = {
            k: statistics.median(r[k] for r in rows)
            for k in ("applied", "tokens_until_applied", "sized", "stall", "typical")
        }
        lines.append(f"| to {budget} at token {at} | {1000 * med['applied']:.1f} | {med['tokens_until_applied']:.0f} | "
                     f"{1000 * med['sized']:.1f} | {1000 * med['stall']:.1f} | {1000 * med['typical']:.1f} |")
    lines += ["", "Target: a change applies within one token plus its swap time."]
    out = RESULTS / f"budget-latency-{model}-{device}.md"
    out.write_text("\n".join(lines) + "\n")
    return out
