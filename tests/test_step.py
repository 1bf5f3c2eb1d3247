"""The step guard: every forward and every swap batch runs under the step lock (engine/decode/step.py's discipline)."""

from __future__ import annotations

import threading

import pytest

from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings

IDS = [3, 14, 15, 9, 2, 6, 5, 3]


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # the compact step, and transformers' forward
def test_every_forward_goes_through_the_guard_holding_the_lock(tiny_model, family: str) -> None:
    with Engine.load(tiny_model(family), budget="50%") as engine:
        assert (engine.compact is not None) == (family == "olmoe")
        forwards: list[bool] = []
        embeddings = engine.model.get_input_embeddings()  # every forward, on either path, starts there
        embeddings.register_forward_pre_hook(lambda *_: forwards.append(engine.guard.held()))
        engine.logits(IDS)
        engine.score(IDS, chunk=3)
        list(engine.generate(IDS, SamplingSettings(max_new_tokens=5)))
        assert forwards and all(forwards)
        assert len(forwards) == engine.guard.steps  # nothing ran the model around the guard
        assert not engine.guard.held()


def test_swap_batches_are_installed_under_the_lock_and_never_mid_forward(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="30%") as engine:
        installs: list[tuple[str, bool]] = []
        for committee in engine.committees:
            apply = committee.apply_swaps

            def checked(swaps, start, background=False, apply=apply):
                installs.append((threading.current_thread().name, engine.runtime.lock._is_owned()))
                return apply(swaps, start, background)

            committee.apply_swaps = checked
        list(engine.generate(IDS * 4, SamplingSettings(max_new_tokens=24)))
        engine.runtime.swaps_due.set()
        assert installs and all(held for _, held in installs)
        assert engine.runtime.swaps_during_forward == 0
