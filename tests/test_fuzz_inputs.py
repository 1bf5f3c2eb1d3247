"""Random damage to a valid model folder: the engine either answers exactly as transformers does, or says why.

Bounded and seeded: each run tries the same mutations of config.json and of the safetensors header.
The only allowed outcomes are a typed ``ExpertSwapError``, or a load whose greedy tokens equal
transformers' own on the same damaged folder.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from expertswap.engine import Engine
from expertswap.protocol import ExpertSwapError, SamplingSettings

from .test_bad_input import _rewrite_header

MUTATIONS = 48
VALUES = [None, "eight", -1, 0, 1, 3, 10**12, 2.5, float("nan"), [], {}, True, [4, 4]]
IDS = [3, 14, 15, 9, 2]


def _mutate_config(rng: random.Random, config: dict) -> object:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([None, [], 7, "config"])
    key = rng.choice(sorted(config))
    if roll < 0.25:
        return {k: v for k, v in config.items() if k != key}
    return {**config, key: rng.choice(VALUES)}


def _mutate_header(rng: random.Random, header: dict) -> object:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([[], "header", 0, None])
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    if roll < 0.2:
        return {k: v for k, v in header.items() if k != key}
    entry = dict(header[key])
    field = rng.choice(["dtype", "shape", "data_offsets"])
    entry[field] = rng.choice([*VALUES, "F16", "I32", "BF16", "Q4", [0, 4], [8, 4], [-4, 4], [1, 2, 3]])
    return {**header, key: entry}


def _engine_tokens(folder: Path) -> list[int]:
    with Engine.load(folder, budget="50%") as engine:
        return list(engine.generate(IDS, SamplingSettings(max_new_tokens=4)))


def _reference_tokens(folder: Path, count: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    out = model.generate(torch.tensor([IDS]), max_new_tokens=4, do_sample=False)
    return out[0, len(IDS) :].tolist()[:count]


def test_random_damage_is_typed_or_exact(tiny_model, tmp_path: Path) -> None:
    rng = random.Random(20261129)
    source = tiny_model("qwen3_moe")
    outcomes = {"typed": 0, "exact": 0}
    for n in range(MUTATIONS):
        folder = tmp_path / f"m{n}"
        shutil.copytree(source, folder)
        if n % 2:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(_mutate_config(rng, config)))
        else:
            _rewrite_header(next(folder.glob("*.safetensors")), lambda h: _mutate_header(rng, h))
        try:
            tokens = _engine_tokens(folder)
        except ExpertSwapError:
            outcomes["typed"] += 1
        else:
            assert tokens == _reference_tokens(folder, len(tokens)), f"mutation {n} gave other tokens"
            outcomes["exact"] += 1
        shutil.rmtree(folder)
    assert outcomes["typed"] > MUTATIONS // 3 and outcomes["exact"] > 0, outcomes  # the mutations did bite
