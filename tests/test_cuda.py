"""The CUDA path: committees live on the GPU, host tiers are pinned, output still matches transformers."""

from __future__ import annotations

import pytest
import torch

from expertswap.engine import Engine
from expertswap.protocol import SamplingSettings

pytestmark = pytest.mark.cuda
PROMPT = "Dictionaries map hashable keys to arbitrary values; a lookup"


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("budget", ["100%", "50%", "min"])
def test_exact_on_cuda_matches_transformers(tiny_model, reference, family: str, budget: str) -> None:
    folder = tiny_model(family)
    ref = reference(folder)
    probe = Engine.load(folder)
    engine = Engine.load(folder, budget=probe.minimum_budget_bytes if budget == "min" else budget, device="cuda")
    probe.close()
    assert all(p.is_cuda for c in engine.committees for p in c.inner.parameters())
    ids = engine.encode(PROMPT)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.logits(ids), expected, atol=1e-3, rtol=0)
    tokens = []
    for token in engine.generate(ids, SamplingSettings(max_new_tokens=12)):
        tokens.append(token)
        assert engine.resident_expert_bytes() <= engine.budget_bytes
    expected_tokens = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert tokens == expected_tokens
    engine.close()


def test_ram_tier_is_pinned_and_substitute_never_loads_while_decoding(tiny_model) -> None:
    engine = Engine.load(tiny_model("qwen3_moe"), budget="50%", device="cuda", policy="substitute", ram_tier=True,
                         swapper=False)
    tensor = next(iter(engine.store.read(engine.committees[0].layer, 0).values()))
    assert tensor.is_pinned()
    ids = engine.encode(PROMPT)
    stream = engine.generate(ids, SamplingSettings(max_new_tokens=10))
    next(stream)
    loads = engine.stats().expert_loads
    rest = list(stream)
    assert rest and engine.stats().expert_loads == loads
    engine.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_cpu_policy_computes_misses_on_the_host_exactly(tiny_model, reference, family: str) -> None:
    folder = tiny_model(family)
    with Engine.load(folder, budget="50%", device="cuda", policy="cpu", swapper=False) as engine:
        ids = engine.encode(PROMPT)
        stream = engine.generate(ids, SamplingSettings(max_new_tokens=12))
        tokens = [next(stream)]
        loads = engine.stats().expert_loads
        tokens += list(stream)
        stats = engine.stats()
    expected = reference(folder).generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert tokens == expected[0, len(ids):].tolist()
    assert stats.cpu_computed > 0
    assert stats.expert_loads == loads, "cpu policy never transfers an expert while decoding"


def test_budget_schedule_with_swapper_stream_on_cuda(tiny_model, reference) -> None:
    folder = tiny_model("mixtral")
    with Engine.load(folder, budget="100%", device="cuda") as engine:
        assert engine.copier.stream is not None
        ids = engine.encode(PROMPT)
        tokens = []
        for token in engine.generate(ids, SamplingSettings(max_new_tokens=24)):
            tokens.append(token)
            assert engine.resident_expert_bytes() <= engine.budget_bytes
            if len(tokens) in (4, 12):
                engine.set_budget({4: "30%", 12: "80%"}[len(tokens)])
        engine.swapper.run_once()
        assert engine.stats().background_swaps > 0
        assert engine.runtime.swaps_during_forward == 0
    expected = reference(folder).generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert tokens == expected[0, len(ids):].tolist()


def test_out_of_memory_on_the_gpu_shrinks_and_stays_exact(tiny_model) -> None:
    from .test_oom import IDS, SETTINGS, _fail_calls

    folder = tiny_model("qwen3_moe")
    with Engine.load(folder, budget="100%", device="cuda") as clean:
        expected = list(clean.generate(IDS, SETTINGS))
    with Engine.load(folder, budget="100%", device="cuda") as engine:
        before = engine.budget_bytes
        _fail_calls(engine, {4})
        assert list(engine.generate(IDS, SETTINGS)) == expected
        assert engine.budget_bytes < before and engine.resident_expert_bytes() <= engine.budget_bytes


def test_cuda_graphs_are_captured_once_and_again_after_a_resize_and_stay_exact(tiny_model) -> None:
    with Engine.load(tiny_model("olmoe"), budget="100%", device="cuda", dtype="bfloat16") as engine:
        assert engine.graphed is not None
        ids = engine.encode(PROMPT)
        first = list(engine.generate(ids, SamplingSettings(max_new_tokens=16)))
        assert engine.graphed.captures == 1
        assert list(engine.generate(ids, SamplingSettings(max_new_tokens=16))) == first
        assert engine.graphed.captures == 1, "a second reply of the same length replays the same graphs"
        engine.set_budget("50%")
        assert list(engine.generate(ids, SamplingSettings(max_new_tokens=16))) == first
        assert engine.graphed.captures == 2 and engine.stats().misses > 0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_experts_on_cuda_give_the_dequantised_models_logits(tiny_model, kind: str) -> None:
    """bitsandbytes dequantises on the GPU exactly as on the CPU: the slots' output is the quantised model's."""
    from .test_quantize import IDS, _dequantised_reference

    folder = tiny_model("qwen3_moe")
    with torch.no_grad():
        want = _dequantised_reference(folder, kind)(torch.tensor([IDS])).logits[0]
    for budget in ("100%", "50%"):
        with Engine.load(folder, budget=budget, device="cuda", quantize=kind, swapper=False) as engine:
            torch.testing.assert_close(engine.logits(IDS).cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_native_fp8_and_mxfp4_checkpoints_on_cuda_give_transformers_logits(packed_model, family: str) -> None:
    """FP8 slots unpack on the GPU per forward; GPT-OSS's MXFP4 unpacks on the host into bf16/fp32 slots."""
    from .test_native_formats import IDS, _reference

    folder = packed_model(family)
    with torch.no_grad():
        want = _reference(folder)(torch.tensor([IDS])).logits[0]
    for budget in ("100%", "50%"):
        with Engine.load(folder, budget=budget, device="cuda", swapper=False) as engine:
            torch.testing.assert_close(engine.logits(IDS).cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_close_gives_the_device_memory_back_while_the_engine_is_still_referenced(tmp_path, budget: str) -> None:
    """The app loading a second model, and benchmarks building engines in turn, still hold the first: 12.9 GB
    stayed allocated on an H200 after close() until the object was collected."""
    from tools.synthetic import build_model

    folder = build_model("olmoe", tmp_path / "m", num_experts=32, top_k=4, layers=4, hidden=1024, intermediate=512,
                         heads=16, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine = Engine.load(folder, budget=budget, device="cuda", ram_tier=True)
    list(engine.generate([5, 6, 7, 8], SamplingSettings(max_new_tokens=16, temperature=0)))  # graphs captured
    assert torch.cuda.memory_allocated() - before > 150 * 2**20
    engine.close()
    assert torch.cuda.memory_allocated() - before <= 64 * 2**20
    assert engine.store.host_bytes == 0  # the pinned RAM tier too


def test_zero_copy_kernels_give_the_same_bits_from_pinned_host_memory_as_from_a_slot() -> None:
    """The miss path reads an expert over PCIe, the hit path from device memory: the same math on the same bytes
    gives the same bits, and the copy the kernel writes on its way into the slot is the expert."""
    import torch.nn.functional as F

    from expertswap.engine.moe.kernels import sum_pairs, swiglu_pairs

    torch.manual_seed(0)
    hidden, inner, experts = 1024, 352, 6  # not multiples of the kernels' tiles
    device, dtype = "cuda", torch.bfloat16
    gate_up = torch.randn(experts, 2 * inner, hidden, dtype=dtype) * 0.05
    down = torch.randn(experts, hidden, inner, dtype=dtype) * 0.05
    host = [t.pin_memory() for t in (gate_up, down)]
    host_addresses = tuple(torch.tensor([t[e].data_ptr() for e in range(experts)], device=device) for t in host)
    index = torch.tensor([5, 1, 3, 0], device=device)  # pair i's expert sits in (or comes into) slot i
    slot_map = torch.full((experts,), -1, device=device)
    slot_map[index] = torch.arange(4, device=device)
    held = [t[index.cpu()].to(device) for t in (gate_up, down)]
    x = torch.randn(hidden, dtype=dtype, device=device)
    weights = torch.rand(4, device=device)
    hit = swiglu_pairs(x, index, None, slot_map, host_addresses, (held[0], held[1]), weights)
    partly = [t.clone() for t in held]
    for t in partly:
        t[1::2] = 0  # slots 1 and 3 are being filled
    fill = torch.tensor([-1, 1, -1, 3], device=device)
    miss = swiglu_pairs(x, index, fill, slot_map, host_addresses, (partly[0], partly[1]), weights)
    assert torch.equal(hit, miss)
    assert all(torch.equal(p, h) for p, h in zip(partly, held, strict=True))
    for i in range(4):
        gate, up = F.linear(x, held[0][i]).chunk(2)
        want = F.linear(F.silu(gate) * up, held[1][i]) * weights[i].to(dtype)
        torch.testing.assert_close(hit[i], want, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(sum_pairs(hit), hit.float().sum(0, keepdim=True).to(dtype), atol=0, rtol=2**-7)


@pytest.mark.parametrize("eviction", ["importance", "lru", "lfu"])
def test_a_tokens_bookkeeping_in_one_program_each_makes_the_torch_codes_decisions(eviction: str) -> None:
    """``observe`` and ``place`` of one token as one Triton program each (the CUDA decode step's) against the torch
    code the CPU and the replay run, over random routings, shapes and budgets: the same counts, stamps, victims,
    maps and logs; importance within float rounding (|x| summed in another order). An expert's norm is learnt a
    token after it came in, as the host learns it when decode steps are queued ahead: unknown norms rank as the
    known ones' mean."""
    import random

    from expertswap.engine.moe.expert_cache import ExpertCache

    rng = random.Random(3)
    for experts, k, capacity in ((32, 8, 8), (60, 4, 30), (12, 3, 5), (128, 8, 37)):
        caches = [ExpertCache(experts, k, capacity, torch.device("cuda"), eviction) for _ in range(2)]
        caches[0].kernels = False  # the torch code
        assert caches[1].kernels
        for cache in caches:
            for slot in range(capacity - 2):  # two empty slots to start with
                cache.slots.install(slot, slot)
            cache.slots.publish()
            cache.norms[: capacity - 2] = torch.linspace(1.0, 2.0, experts)[: capacity - 2]
        norms, learnt = torch.linspace(1.0, 2.0, experts, device="cuda"), []
        for _ in range(100):
            index = torch.tensor([rng.sample(range(experts), k)], device="cuda")
            weights, hidden = torch.rand(1, k, device="cuda"), torch.randn(1, 96, device="cuda", dtype=torch.bfloat16)
            resident = [cache.observe(index, weights, hidden)[2] for cache in caches]
            assert torch.equal(*resident)
            for want, got in zip(*(cache.device_state() for cache in caches), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            caches[1].importance.copy_(caches[0].importance)  # the decisions compared from the same state
            logs = [torch.full((k, 3), 7, device="cuda") for _ in caches]
            fills = [cache.place(index, log) for cache, log in zip(caches, logs, strict=True)]
            assert torch.equal(*logs) and torch.equal(*fills)
            assert torch.equal(caches[0].slots.padded_map, caches[1].slots.padded_map)
            assert torch.equal(caches[0].slots.padded_slots, caches[1].slots.padded_slots)
            for cache, log in zip(caches, logs, strict=True):
                for expert, slot, _ in (row for row in log.tolist() if row[0] >= 0):
                    cache.slots.install(slot, expert)
                cache.norms[learnt] = norms[learnt]  # those the token before brought in
            learnt = [row[0] for row in logs[0].tolist() if row[0] >= 0]


def test_fused_norm_and_rotary_give_transformers_values_in_one_kernel_each() -> None:
    """The step's RMSNorm and rotary embedding, one kernel each: the rotary gives eager's bits, the norm (its mean
    summed in another order) at most one bf16 rounding step away, on the views the step hands them."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    from expertswap.engine.decode import fused
    from expertswap.engine.decode.compact_step import _rotate
    from expertswap.engine.device import triton_serves

    torch.manual_seed(0)
    assert triton_serves(torch.device("cuda"), torch.bfloat16)
    norm = OlmoeRMSNorm(128, eps=1e-5).to("cuda", torch.bfloat16)
    norm.weight.data = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(3, 8 * 128 + 2 * 4 * 128, device="cuda", dtype=torch.bfloat16) * 3
    for x in (qkv[:, 128:256], qkv[:, : 8 * 128].view(3, 8, 128)):  # a slice of a wider row; heads of a view
        want = norm(x)
        got = fused.rms_norm(x, norm.weight, 1e-5)
        torch.testing.assert_close(got, want, atol=0, rtol=2**-7)
        assert (got != want).float().mean() < 0.02
    q = qkv[:, : 8 * 128].view(3, 8, 128).transpose(0, 1)  # [heads, T, D], as the step rotates it
    cos, sin = (torch.randn(3, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert torch.equal(fused.rotate(q, cos, sin), _rotate(q, cos, sin))


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "norm", "clip"), [
    (16, 16, 128, "whole", None), (16, 4, 64, "head", None), (8, 2, 128, None, None), (12, 4, 128, "whole", 0.5),
    (16, 4, 128, "head", 0.25)])
def test_one_kernel_for_a_tokens_qkv_gives_the_norm_clip_and_rotary_of_the_step(heads: int, kv_heads: int, dim: int,
                                                                                norm: str | None,
                                                                                clip: float | None) -> None:
    """``decode_qkv`` against the ops the prompt runs one by one (norm over the projection or per head, clip,
    rotary): the same bits without a norm, at most one bf16 rounding step away with one (its mean summed in
    another order); k and v land in the caches at the position and nothing else there is written."""
    from expertswap.engine.decode import fused
    from expertswap.engine.decode.compact_step import _rotate

    torch.manual_seed(0)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    qkv = torch.randn(1, (heads + 2 * kv_heads) * dim, **bf16) * 3
    widths = {"whole": (heads * dim, kv_heads * dim), "head": (dim, dim)}.get(norm or "", (0, 0))
    weights = [torch.randn(w, **bf16) for w in widths]
    cos, sin = torch.randn(1, dim, **bf16), torch.randn(1, dim, **bf16)
    capacity, position = 64, 37
    keys, values = (torch.full((1, kv_heads, capacity, dim), float("nan"), **bf16) for _ in range(2))
    at = torch.tensor([position], device="cuda")
    norms = torch.cat(weights) if norm else None
    got = fused.decode_qkv(qkv, norms, norm == "head", 1e-6, clip, cos, sin, keys, values, at, heads)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    if norm == "whole":
        q, k = fused.rms_norm(q, weights[0], 1e-6), fused.rms_norm(k, weights[1], 1e-6)
    if clip is not None:
        q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
    q, k, v = q.view(1, heads, dim), k.view(1, kv_heads, dim), v.view(1, kv_heads, dim)
    if norm == "head":
        q, k = fused.rms_norm(q, weights[0], 1e-6), fused.rms_norm(k, weights[1], 1e-6)
    want_q, want_k = _rotate(q.transpose(0, 1), cos, sin), _rotate(k.transpose(0, 1), cos, sin)
    close = {"atol": 0, "rtol": 2**-7} if norm else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(got, want_q, **close)
    torch.testing.assert_close(keys[0, :, position], want_k[:, 0], **close)
    assert torch.equal(values[0, :, position], v[0])
    others = torch.ones(capacity, dtype=torch.bool)
    others[position] = False
    assert keys[0, :, others].isnan().all() and values[0, :, others].isnan().all()


def test_residual_adds_fused_into_the_kernel_before_them_round_as_the_add_alone() -> None:
    """The add before the post-attention norm and the add after the pair sum, each inside one kernel: the sum's
    bits equal the plain add's, the norm that of the norm kernel alone."""
    from expertswap.engine.decode import fused
    from expertswap.engine.moe.kernels import sum_pairs

    torch.manual_seed(0)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x, delta, weight = torch.randn(1, 1000, **bf16), torch.randn(1, 1000, **bf16), torch.randn(1000, **bf16)
    total, normed = fused.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, fused.rms_norm(x + delta, weight, 1e-5), atol=0, rtol=2**-7)
    pairs, h, out = torch.randn(8, 1000, **bf16), torch.randn(1, 1000, **bf16), torch.empty(1, 1000, **bf16)
    assert sum_pairs(pairs, (h, out)) is out and torch.equal(out, h + sum_pairs(pairs))


def test_decode_attention_reads_the_cache_up_to_the_position_only_and_gives_attentions_values() -> None:
    """The decode step's attention of one query, split over the cache and combined: fp32 attention's values over
    the filled positions, with and without grouped heads; what lies past the position (NaN here) is never read.
    The token's own keys and values are written at the position by one kernel (``decode_qkv``)."""
    import torch.nn.functional as F

    from expertswap.engine.decode import fused

    torch.manual_seed(0)
    for heads, kv_heads, capacity, dim, position in ((16, 16, 256, 128, 0), (16, 4, 512, 64, 300),
                                                     (8, 2, 1024, 128, 1023), (16, 16, 4096, 128, 2999)):
        q = torch.randn(heads, 1, dim, device="cuda", dtype=torch.bfloat16)
        keys, values = (torch.randn(1, kv_heads, capacity, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        keys[:, :, position + 1 :] = float("nan")
        values[:, :, position + 1 :] = float("nan")
        qkv = torch.randn(1, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
        at = torch.tensor([position], device="cuda")
        ones = torch.ones(1, dim, device="cuda", dtype=torch.bfloat16)
        fused.decode_qkv(qkv, None, False, 0.0, None, ones, 0 * ones, keys, values, at, heads)  # rotation by 0
        new = qkv[0, heads * dim :].view(2, kv_heads, dim)
        assert torch.equal(keys[0, :, position], new[0]) and torch.equal(values[0, :, position], new[1])
        got = fused.decode_attention(q, keys, values, at, dim**-0.5)
        seen = slice(0, position + 1)
        want = F.scaled_dot_product_attention(q[None].float(), keys[:, :, seen].float(), values[:, :, seen].float(),
                                              scale=dim**-0.5, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(got.float(), want[0].transpose(0, 1).reshape(1, -1), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_host_free_decode_gives_100_percents_tokens_in_one_graph_a_token(tiny_model, family: str,
                                                                           budget: str) -> None:
    folder = tiny_model(family)
    with Engine.load(folder, budget="100%", device="cuda", dtype="bfloat16", ram_tier=True) as full:
        ids = full.encode(PROMPT)
        expected = list(full.generate(ids, SamplingSettings(max_new_tokens=32)))
        assert full.graphed is not None and full.graphed.graphs_per_token == 1
        smallest = full.minimum_budget_bytes
    with Engine.load(folder, budget=smallest if budget == "min" else budget, device="cuda", dtype="bfloat16",
                     ram_tier=True) as engine:
        events = engine.subscribe()
        before = engine.stats().misses
        assert list(engine.generate(ids, SamplingSettings(max_new_tokens=32))) == expected
        assert engine.graphed is not None and engine.graphed.graphs_per_token == 1
        assert engine.stats().misses > before
        assert any(getattr(e, "reason", None) == "miss" for e in events.drain())
        assert engine.resident_expert_bytes() <= engine.budget_bytes
        _the_host_follows_the_device(engine)


def _the_host_follows_the_device(engine: Engine) -> None:
    """The host's maps are the device's, and every slot holds the bytes of the expert it claims."""
    for committee in engine.committees:
        slots = committee.slots
        assert slots.device_map.tolist() == [slots.slot_of(e) for e in range(committee.num_experts)]
        assert slots.device_slots.tolist() == slots.slot_to_expert
        for slot, expert in enumerate(slots.slot_to_expert):
            if expert >= 0:
                held = committee.storage.read(slot)
                holds = [e for e in range(committee.num_experts) if all(
                    torch.equal(held[n].cpu(), t) for n, t in engine.store.read(committee.layer, e).items())]
                assert holds == [expert], f"layer {committee.layer} slot {slot}: {expert} claimed, holds {holds}"


def test_steps_queued_ahead_on_the_gpu_stop_move_budgets_and_leave_the_maps_settled(tiny_model) -> None:
    """Greedy steps queued one ahead of the host (the host-free step at 50%, nobody listening): 100%'s tokens;
    a stop token's step ahead is taken back; budgets moved mid-reply land on settled committees."""
    folder = tiny_model("olmoe")
    settings = SamplingSettings(max_new_tokens=32)
    with Engine.load(folder, budget="100%", device="cuda", dtype="bfloat16", ram_tier=True) as full:
        ids = full.encode(PROMPT)
        expected = list(full.generate(ids, settings))
    with Engine.load(folder, budget="50%", device="cuda", dtype="bfloat16", ram_tier=True) as engine:
        steps = engine.guard.steps
        assert list(engine.generate(ids, settings)) == expected
        assert engine.guard.steps - steps == 32
        _the_host_follows_the_device(engine)
        stop = expected[9]
        engine.decoder.stop_ids.add(stop)
        steps = engine.guard.steps
        assert list(engine.generate(ids, settings)) == expected[: expected.index(stop) + 1]
        assert engine.guard.steps - steps == expected.index(stop) + 2  # the stop token's step, queued ahead
        assert engine.graphed is not None and engine.graphed.cache is not None
        assert engine.graphed.cache.length == len(ids) + expected.index(stop)
        engine.decoder.stop_ids.discard(stop)
        _the_host_follows_the_device(engine)
        got = []
        for token in engine.generate(ids, settings):
            got.append(token)
            if len(got) in (5, 12, 20):
                engine.set_budget({5: "25%", 12: "75%", 20: "50%"}[len(got)])
                _the_host_follows_the_device(engine)
        assert got == expected
        _the_host_follows_the_device(engine)


def test_conversations_continue_from_their_caches_through_the_graphed_steps_shared_cache(tiny_model) -> None:
    """Two chats taking turns on the graphed step (one persistent cache): the live one continues in place, the
    other is parked in host memory and copied back in; each reply is what an engine keeping nothing gives."""
    folder = tiny_model("olmoe")
    settings = SamplingSettings(max_new_tokens=16)
    with Engine.load(folder, budget="50%", device="cuda", dtype="bfloat16", ram_tier=True) as engine, \
            Engine.load(folder, budget="50%", device="cuda", dtype="bfloat16", ram_tier=True) as fresh:
        chats = [[{"role": "user", "content": "Tell me about the sea."}],
                 [{"role": "user", "content": "Tell me about rocks."}]]
        for turn in range(3):
            for chat in chats:
                ids = engine.encode_chat(chat)
                got = list(engine.generate(ids, settings))
                cached = engine.stats().cached_prompt_tokens
                fresh.forget_kept_caches()
                assert got == list(fresh.generate(ids, settings)), f"turn {turn}"
                assert not turn or cached > len(ids) // 2
                assert engine.graphed is not None and engine.graphed.graphs_per_token == 1
                chat += [{"role": "assistant", "content": engine.decode(got)}, {"role": "user", "content": "Go on."}]
        parked = engine.decoder.prefixes.parked
        assert len(parked) == 1 and all(t.device.type == "cpu" for t in parked[0].session.cache.keys)
        _the_host_follows_the_device(engine)
