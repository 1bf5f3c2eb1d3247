"""Peak RSS and decode speed of each policy at 100/50/25% budget on a small synthetic MoE.

Each configuration runs in its own process so that peak RSS belongs to that configuration alone.
Usage: python -m benchmarks.core_sweep [--device cpu|cuda] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
SHAPE = {"num_experts": 32, "top_k": 4, "layers": 4, "hidden": 256, "intermediate": 256, "heads": 4}

RUN = """
import json, sys
from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings
folder, budget, policy, device, tokens, swapper = sys.argv[1:7]
engine = Engine.load(folder, budget=budget, policy=policy, device=device, swapper=swapper == "on")
ids = engine.encode("Exceptions are raised when an error is detected during execution; a handler")
out = list(engine.generate(ids, SamplingSettings(max_new_tokens=int(tokens))))
s = engine.stats()
print(json.dumps({"tokens": len(out), "tok_s": s.tokens_per_s, "ttft": s.time_to_first_token_s,
                  "peak_rss": s.peak_rss_bytes, "hit_rate": s.hit_rate, "loads": s.expert_loads,
                  "resident": s.peak_resident_expert_bytes, "budget_bytes": s.budget_bytes,
                  "total": s.total_expert_bytes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from tools.synthetic import build_model

    folder = build_model("qwen3_moe", Path(tempfile.mkdtemp()) / "m", init_std=0.02, **SHAPE)
    rows = []
    for policy in ("exact", "substitute"):
        for swapper in ("off", "on"):
            for budget in ("100%", "50%", "25%"):
                run = subprocess.run([sys.executable, "-c", RUN, str(folder), budget, policy, args.device,
                                      str(args.tokens), swapper], capture_output=True, text=True, check=True)
                result = json.loads(run.stdout.strip().splitlines()[-1])
                rows.append({"policy": policy, "swapper": swapper, "budget": budget, **result})
                print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    lines = [
        f"# Engine core sweep ({args.device})",
        "",
        (
            f"{stamp(args.device)}. Synthetic Qwen3-MoE {SHAPE}, fp32, greedy, "
            f"{args.tokens} new tokens; experts {rows[0]['total'] / 2**20:.1f} MiB in all."
        ),
        "",
        (
            "| policy | swapper | budget | tokens/s | first token (s) | hit rate | expert loads | "
            "peak resident experts (MiB) | peak RSS (MiB) |"
        ),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['swapper']} | {r['budget']} | {r['tok_s']:.1f} | {r['ttft']:.3f} | "
            f"{r['hit_rate']:.2f} | "
            f"{r['loads']} | {r['resident'] / 2**20:.1f} | {r['peak_rss'] / 2**20:.0f} |"
        )
    out = RESULTS / f"core-sweep-{args.device.split(':')[0]}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
