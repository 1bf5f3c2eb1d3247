"""Every family, every budget: the committee must reproduce plain transformers."""

from __future__ import annotations

import pytest
import torch

from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings

from .conftest import ALL_FAMILIES

PROMPT = "The built-in function len() returns the number of items in a container, and"
NEW_TOKENS = 12


def _reference_tokens(ref, ids: list[int]) -> list[int]:
    out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def _slot_bytes(engine: Engine) -> int:
    """Resident bytes counted independently of the engine: every parameter the committees own."""
    tensors = [
        t
        for c in engine.committees
        for t in [*c.inner.parameters(), *(w for slot in getattr(c.storage, "slots", []) for w in slot.values())]
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def _load(folder, budget: str, policy: str = "exact", swapper: bool = True) -> Engine:
    probe = Engine.load(folder, budget="100%", swapper=False)
    minimum = probe.minimum_budget_bytes
    probe.close()
    return Engine.load(folder, budget=minimum if budget == "min" else budget, policy=policy, swapper=swapper)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("budget", ["100%", "50%", "min"])
def test_exact_matches_transformers(tiny_model, reference, family: str, budget: str) -> None:
    folder = tiny_model(family)
    ref = reference(folder)
    engine = _load(folder, budget)
    ids = engine.encode(PROMPT)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.logits(ids), expected, atol=1e-4, rtol=0)

    tokens = []
    for token in engine.generate(ids, SamplingSettings(max_new_tokens=NEW_TOKENS)):
        tokens.append(token)
        assert _slot_bytes(engine) <= engine.budget_bytes
        assert engine.resident_expert_bytes() == _slot_bytes(engine)
    assert tokens == _reference_tokens(ref, ids)
    stats = engine.stats()
    assert stats.peak_resident_expert_bytes <= stats.budget_bytes
    if budget == "100%":
        assert stats.misses == 0
    else:
        assert stats.misses > 0 and stats.expert_loads > 0, "a reduced budget must swap"
    engine.close()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_substitute_full_budget_is_identical(tiny_model, reference, family: str) -> None:
    folder = tiny_model(family)
    engine = _load(folder, "100%", policy="substitute")
    ids = engine.encode(PROMPT)
    tokens = list(engine.generate(ids, SamplingSettings(max_new_tokens=NEW_TOKENS)))
    assert tokens == _reference_tokens(reference(folder), ids)
    assert engine.stats().substituted == 0
    engine.close()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("swapper", [False, True])
def test_substitute_half_budget_never_loads_while_decoding(tiny_model, family: str, swapper: bool) -> None:
    """No decode step waits for a load; only the background swapper (when on) changes the committee."""
    engine = _load(tiny_model(family), "50%", policy="substitute", swapper=swapper)
    events = engine.subscribe()
    ids = engine.encode(PROMPT)
    loads_after_prompt = None
    count = 0
    for count, _ in enumerate(engine.generate(ids, SamplingSettings(max_new_tokens=NEW_TOKENS)), start=1):  # noqa: B007 (read below)
        if loads_after_prompt is None:
            loads_after_prompt = engine.stats().expert_loads
            events.drain()
        assert engine.resident_expert_bytes() <= engine.budget_bytes
    stats = engine.stats()
    assert count > 1
    assert stats.substituted > 0, "at half the experts some routings must be substituted"
    assert not [e for e in events.drain() if e.type == "swap" and e.reason == "miss"]
    if not swapper:
        assert stats.expert_loads == loads_after_prompt, "substitute must not load during decode"
    engine.close()


def test_long_prompt_at_minimum_budget_runs_in_passes(tiny_model, reference) -> None:
    """A prefill that routes to more experts than slots computes in several passes, still exact."""
    folder = tiny_model("mixtral")
    engine = _load(folder, "min")
    ids = engine.encode(PROMPT * 4)
    with torch.inference_mode():
        expected = reference(folder)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.logits(ids), expected, atol=1e-4, rtol=0)
    assert engine.runtime.counters.extra_passes > 0
    assert all(c.capacity == c.top_k for c in engine.committees)
    engine.close()


def test_expert_reads_equal_transformers_weights(tiny_model, reference) -> None:
    """The store assembles each family's disk layout into exactly the fused tensors transformers builds."""
    for family in ALL_FAMILIES:
        folder = tiny_model(family)
        ref = reference(folder)
        engine = Engine.load(folder, budget="100%")
        for committee in engine.committees:
            fused = ref.get_submodule(_experts_path(ref, committee.layer))
            for expert in range(committee.num_experts):
                for name, tensor in engine.store.read(committee.layer, expert).items():
                    assert torch.equal(tensor, getattr(fused, name)[expert]), (family, committee.layer, name)
        engine.close()


def _experts_path(model, layer: int) -> str:
    for name, _ in model.named_modules():
        if name.endswith(".experts") and f"layers.{layer}." in name:
            return name
    raise AssertionError(f"no experts module in layer {layer}")


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_a_bf16_model_matches_transformers_on_the_cpu_rows(open_engine, tmp_path, family: str) -> None:
    """Checkpoints ship in bf16; DeepSeek routes in float32, so each expert's weighted output is cast back
    (it crashed on mixed dtypes). Sums in another order differ by a bf16 rounding step at most."""
    from transformers import AutoModelForCausalLM

    from tools.synthetic import build_model

    folder = build_model(family, tmp_path / family, layers=3, dtype=torch.bfloat16)
    engine = open_engine(folder, budget="50%", swapper=False)
    ids = engine.encode(PROMPT)
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(folder).eval()(torch.tensor([ids])).logits[0]
    got = engine.logits(ids)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.02)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
