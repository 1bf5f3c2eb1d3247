"""The fast CPU step: prepacked bf16 weights, routed-only experts, the compact forward and its static cache.

Exact stays exact: at every budget the engine's greedy tokens and logits are bit-identical to its
own full residency, and close to transformers' bf16 forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertswap.engine import Engine
from expertswap.engine.decode.graphed_step import GraphedDecode
from expertswap.engine.decode.session import CompactSession
from expertswap.engine.moe import slot_storage
from expertswap.engine.weights.packed import packing_pays
from expertswap.protocol import SamplingSettings

PROMPT = "The built-in function len() returns the number of items in a container, and"


def _minimum(folder, dtype: str) -> int:
    with Engine.load(folder, budget="100%", dtype=dtype, swapper=False) as probe:
        return probe.minimum_budget_bytes


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "gpt_oss"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_budget_gives_the_full_residency_result_bit_for_bit(tiny_model, reference, family: str,
                                                                   dtype: str) -> None:
    """Small committees load misses and run in passes; neither may change a single bit."""
    folder = tiny_model(family)
    results = {}
    for budget in ("100%", "50%", _minimum(folder, dtype)):
        with Engine.load(folder, budget=budget, dtype=dtype, swapper=False) as engine:
            # GPT-OSS's experts module has its own forward: its slots stay stacked, on transformers' code
            assert all(isinstance(c.storage, slot_storage.RowSlots) == (family != "gpt_oss") for c in engine.committees)
            packs = packing_pays(engine.device, engine.model.dtype) and family != "gpt_oss"  # bf16 oneDNN CPUs
            assert all(getattr(c.storage, "packed", False) == packs for c in engine.committees)
            ids = engine.encode(PROMPT)
            logits = engine.logits(ids)
            tokens = list(engine.generate(ids, SamplingSettings(max_new_tokens=12)))
            assert engine.resident_expert_bytes() <= engine.budget_bytes
            results[budget] = (logits, tokens, engine.stats().misses)
    full_logits, full_tokens, _ = results.pop("100%")
    for budget, (logits, tokens, misses) in results.items():
        assert misses > 0, f"{budget}: a small committee must miss"
        if family == "gpt_oss" and dtype == "float32":
            # its own eager experts forward on MKL's fp32 matmuls: bounded at ~1e-6 (measured), tokens equal
            torch.testing.assert_close(logits, full_logits, atol=1e-5, rtol=0)
        else:
            assert torch.equal(logits, full_logits), f"{budget}: logits differ from full residency"
        assert tokens == full_tokens
    ref = reference(folder)
    with torch.inference_mode():
        truth = ref(torch.tensor([ids])).logits[0]  # fp32
        if dtype == "float32":
            torch.testing.assert_close(full_logits, truth, atol=1e-4, rtol=0)
            return
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        plain_bf16 = plain(torch.tensor([ids])).logits[0].float()
    # in bf16 the engine is as close to the fp32 truth as transformers' own bf16 forward
    assert (full_logits - truth).abs().mean() <= 1.5 * (plain_bf16 - truth).abs().mean() + 1e-3

@pytest.mark.skipif(not packing_pays(torch.device("cpu"), torch.bfloat16),
                    reason="this CPU's oneDNN has no bf16 kernels: bf16 weights stay plain")
def test_bf16_on_cpu_packs_weights_and_computes_only_routed_experts(tiny_model, monkeypatch) -> None:
    monkeypatch.setattr(slot_storage, "PACK_AFTER_USES", 1)  # experts pack at their first use
    with Engine.load(tiny_model("qwen2_moe"), budget="100%", dtype="bfloat16", swapper=False) as engine:
        assert engine.compact is not None
        assert all(c.storage.packed for c in engine.committees)
        calls: list[int] = []
        original = torch.ops.mkldnn._linear_pointwise

        class Counting:
            def __getattr__(self, name):
                return getattr(original, name)

            def __call__(self, *args, **kwargs):
                calls.append(args[0].shape[0])
                return original(*args, **kwargs)

        ids = engine.encode(PROMPT)
        session = engine.sessions.new(len(ids) + 1)
        with engine.guard.lock, torch.inference_mode():
            session.run(ids)
            torch.ops.mkldnn._linear_pointwise = Counting()
            try:
                session.run([ids[0]])
            finally:
                torch.ops.mkldnn._linear_pointwise = original
        config = engine.model.config
        moe_layers = len(engine.committees)
        dense_layers = config.num_hidden_layers - moe_layers
        # per layer: qkv, o; per MoE layer: shared gate_up, shared down, shared gate, top-k x (gate_up, down)
        expected = 2 * config.num_hidden_layers + moe_layers * (3 + 2 * config.num_experts_per_tok) + 2 * dense_layers
        assert len(calls) == expected + (0 if config.tie_word_embeddings else 1)


def test_the_static_cache_grows_without_changing_a_result(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=False) as engine:
        ids = engine.encode(PROMPT)
        roomy, tight = engine.sessions.new(len(ids)), CompactSession(engine.compact, 1)
        with engine.guard.lock, torch.inference_mode():
            whole = roomy.run(ids, all_logits=True)
            stepped = torch.cat([tight.run([token]) for token in ids])
        assert tight.cache.capacity >= len(ids)
        torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_the_graphed_decode_pieces_reproduce_the_compact_step(tiny_model, family: str, budget: str) -> None:
    """The CUDA step's decomposition (attention+router, loads, experts), run eagerly on the CPU."""
    with Engine.load(tiny_model(family), budget=budget, swapper=False) as engine:
        ids = engine.encode(PROMPT)
        graphed = GraphedDecode(engine.compact, engine.runtime)
        plain, pieces = CompactSession(engine.compact, len(ids) + 8), CompactSession(engine.compact, len(ids) + 8,
                                                                                   graphed)
        with engine.guard.lock, torch.inference_mode():
            a, b = plain.run(ids), pieces.run(ids)
            for _ in range(8):
                token = int(a[-1].argmax())
                assert token == int(b[-1].argmax())
                a, b = plain.run([token]), pieces.run([token])
                torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert graphed.captures == 1 and pieces.cache.length == plain.cache.length
        moe_layers = len(engine.committees)  # the host loads between a layer's halves only where it may miss
        assert len(graphed.pieces) == (1 if budget == "100%" else moe_layers + 1)
        assert engine.stats().misses > 0 if budget == "50%" else engine.stats().misses == 0



def _reply(engine: Engine, ids: list[int], settings: SamplingSettings,
           budgets: dict[int, str] | None = None) -> list[int]:
    """A greedy reply; ``budgets``: the budget to ask for once the reply holds that many tokens."""
    out: list[int] = []
    for token in engine.generate(ids, settings):
        out.append(token)
        if budgets and len(out) in budgets:
            engine.set_budget(budgets[len(out)])
    return out


@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_greedy_steps_queued_ahead_give_the_host_picks(tiny_model, budget: str) -> None:
    """The graphed step's own greedy pick, each step queued before the host reads the one before (run eagerly on
    the CPU): the host's tokens; past a stop token, the step queued ahead is run and taken back out of the cache;
    a budget moved mid-reply lands between two steps and changes no token."""
    with Engine.load(tiny_model("olmoe"), budget=budget, swapper=True) as engine:
        ids = engine.encode(PROMPT)
        settings = SamplingSettings(max_new_tokens=12)
        plain = _reply(engine, ids, settings)
        graphed = GraphedDecode(engine.compact, engine.runtime)
        engine.sessions.graphed = graphed
        engine.forget_kept_caches()  # the kept session is the plain step's
        steps = engine.guard.steps
        assert _reply(engine, ids, settings) == plain
        assert engine.guard.steps - steps == 12 and graphed.cache is not None  # a prefill and 11 steps ahead
        assert graphed.cache.length == len(ids) + 11

        stop = plain[4]
        cut = plain[: plain.index(stop) + 1]
        engine.decoder.stop_ids.add(stop)
        steps = engine.guard.steps
        assert _reply(engine, ids, settings) == cut
        engine.decoder.stop_ids.discard(stop)
        assert engine.guard.steps - steps == len(cut) + 1  # the step of the stop token ran ahead ...
        assert graphed.cache.length == len(ids) + len(cut) - 1  # ... and was taken back

        assert _reply(engine, ids, settings, budgets={3: "25%", 7: "100%"}) == plain
        assert engine.budget_bytes == engine.total_expert_bytes
