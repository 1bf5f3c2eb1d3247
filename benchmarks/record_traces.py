"""Record the committed routing traces (benchmarks/traces/): ``python -m benchmarks record-traces``.

Greedy chat replies, ``exact`` at 100% (routing does not depend on the budget under ``exact``), on the CPU.
The default model's traces are split: ``tune-*`` were used to choose the default policy, ``heldout-*``
never were. The tiny families (random weights from ``tools/synthetic.py``, seed 0) have random routers:
they show what the policies do without locality.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from expertswap.engine import Engine
from expertswap.models import resolve_model
from expertswap.protocol import SamplingSettings
from tools.synthetic import build_model

TRACES = Path(__file__).parent / "traces"
TOKENS = 96
DEFAULT_PROMPTS = {
    "tune-dictionary": "Explain how a Python dictionary stores its keys and what makes lookups fast.",
    "tune-recipe": "Write a short recipe for a vegetable soup, with a list of ingredients and the steps.",
    "heldout-letter": "Write a polite letter to a neighbour asking them to keep their dog off the garden.",
    "heldout-history": "Summarise in a few sentences why the printing press changed how people shared ideas.",
}
TINY_PROMPT = "Tell me about the mountains and rivers of a country you like."


def _record(engine: Engine, prompt: str, path: Path, model: str) -> None:
    ids = engine.encode_chat([{"role": "user", "content": prompt}]) if engine.tokenizer.chat_template else \
        engine.encode(prompt)
    with engine.record_trace(path, model):
        list(engine.generate(ids, SamplingSettings(max_new_tokens=TOKENS)))


def main() -> list[Path]:
    TRACES.mkdir(exist_ok=True)
    written = []
    with Engine.load(resolve_model("default"), budget="100%", swapper=False) as engine:
        for name, prompt in DEFAULT_PROMPTS.items():
            written.append(TRACES / f"default-{name}.jsonl")
            _record(engine, prompt, written[-1], "default")
    with tempfile.TemporaryDirectory() as scratch:
        for family in ("olmoe", "qwen3_moe"):
            folder = build_model(family, Path(scratch) / family, layers=4)
            with Engine.load(folder, budget="100%", swapper=False) as engine:
                written.append(TRACES / f"tiny-{family}.jsonl")
                _record(engine, TINY_PROMPT, written[-1], f"tiny-{family}")
    return written
