"""How well a router-based prefetch predictor would name the default model's experts (CPU, real routing).

The predictor: for each MoE layer L, the experts that layer L+1's router picks from layer L's normed hidden
state (the replay's "router prefetch" contender; the GPU step once prefetched by it, before its kernels read
misses straight from pinned RAM). Measured on the default model's real routing: greedy replies to the
evaluation prompts under ``exact`` at 100%, every MoE layer's router input recorded, and layer L+1's router
applied to it. Precision = predicted experts then used / predicted; recall = used experts that were predicted
/ used. Also for the top 2k of the prediction (twice the copies, higher recall). Decode tokens and prompt
tokens are reported apart. Usage: python -m benchmarks prediction [--tokens 48].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertswap.engine import Engine
from expertswap.engine.decode.compact_step import MoEBlock
from expertswap.models.default_model import DEFAULT_MODEL, resolve_model
from expertswap.protocol import SamplingSettings
from tools.recipe.data import EVAL_PROMPTS

from .stamp import stamp

RESULTS = Path(__file__).parent / "results"


@dataclass
class Counts:
    predicted: int = 0
    used: int = 0
    right: int = 0

    def add(self, guess: torch.Tensor, used: torch.Tensor) -> None:
        for g, u in zip(guess.tolist(), used.tolist(), strict=True):
            self.predicted += len(g)
            self.used += len(u)
            self.right += len(set(g) & set(u))

    def row(self, name: str) -> str:
        return (f"| {name} | {self.right / self.predicted:.3f} | {self.right / self.used:.3f} | "
                f"{self.predicted} |")


@dataclass
class Recorder:
    """Wraps one MoE block's router: keeps each call's input and the experts it chose."""

    router: torch.nn.Module
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.router(x)
        self.calls.append((x.detach().clone(), out[2].detach().clone()))
        return out


def measure(tokens: int) -> dict[str, Counts]:
    counts = {name: Counts() for name in ("decode, top k", "decode, top 2k", "prompt, top k", "prompt, top 2k")}
    with Engine.load(resolve_model(DEFAULT_MODEL), budget="100%", swapper=False) as engine:
        assert engine.compact is not None, "the default model runs on the compact step"
        blocks = [layer.mlp for layer in engine.compact.layers if isinstance(layer.mlp, MoEBlock)]
        recorders = [Recorder(block.router) for block in blocks]
        for block, recorder in zip(blocks, recorders, strict=True):
            block.router = recorder
        for prompt in EVAL_PROMPTS:
            ids = engine.encode_chat([{"role": "user", "content": prompt}])
            engine.forget_kept_caches()  # the recorders see every prompt token
            list(engine.generate(ids, SamplingSettings(max_new_tokens=tokens, temperature=0.0)))
        with torch.no_grad():
            for here, following in itertools.pairwise(recorders):
                k = here.calls[0][1].shape[-1]
                for (y, _), (_, used) in zip(here.calls, following.calls, strict=True):
                    logits, _, guess = following.router(y)  # the engine's own prediction: top k
                    phase = "decode" if y.shape[0] == 1 else "prompt"
                    counts[f"{phase}, top k"].add(guess, used)
                    counts[f"{phase}, top 2k"].add(logits.float().topk(2 * k, dim=-1).indices, used)
    return counts


def write(counts: dict[str, Counts], tokens: int) -> Path:
    path = RESULTS / "prediction-default-cpu.md"
    lines = [
        "# Prefetch predictor on the default model (layer L+1's router on layer L's hidden state)",
        "",
        stamp(),
        "",
        f"Greedy replies to the {len(EVAL_PROMPTS)} evaluation prompts, {tokens} new tokens at most, `exact` 100%,",
        "every MoE layer's router input recorded; the prediction for layer L+1 is that layer's router applied",
        "to layer L's normed hidden state, as the GPU step's prefetch does.",
        "",
        "| tokens, prediction | precision | recall | experts predicted |",
        "| --- | ---: | ---: | ---: |",
        *(c.row(name) for name, c in counts.items()),
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def main(tokens: int) -> None:
    print(write(measure(tokens), tokens).read_text())
