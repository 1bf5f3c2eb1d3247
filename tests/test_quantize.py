"""Quantised experts: the engine's output equals the dequantised full model, and the budget counts quantised bytes."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from expertswap.engine.weights.packed import INT8_ACTIVATIONS, Int8Matrix, Int8Rows
from expertswap.engine.weights.quantize import dequantize, quantize, quantized_nbytes
from expertswap.models import fit_report
from expertswap.protocol import QUANTIZATIONS, SettingsError, UnsupportedArchitectureError

from .conftest import ALL_FAMILIES

IDS = [1, 5, 9, 13, 2, 7, 11, 3]


def _dequantised_reference(folder, kind: str):
    """transformers' model with every expert matrix replaced by what quantising and dequantising it gives."""
    model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").eval()
    for module in model.modules():
        if not isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("_bias"):
                continue
            for e in range(param.shape[0]):
                codes = quantize({name: param.data[e].clone()}, kind)
                param.data[e] = dequantize(codes, kind, {name: tuple(param.shape[1:])}, param.dtype)[name]
    return model


def _eight_bits(rows: torch.Tensor) -> torch.Tensor:
    """Each row as the int8 kernel sees it: symmetric 8-bit codes against the row's own step (largest magnitude over
    127), times that step; in float64 for a float64 reference, else in float32 as the engine makes them."""
    x = rows.to(torch.promote_types(rows.dtype, torch.float32))
    step = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (torch.round(x / step) * step).to(rows.dtype)


class _EightBitRows(TorchFunctionMode):
    """The reference's expert matmuls (transformers' eager loop, ``F.linear`` on one expert's matrix) see their
    activations as the int8 kernel does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for m in model.modules() if hasattr(m, "gate_up_proj")
                         for n, p in m.named_parameters(recurse=False) if not n.endswith("_bias")}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and args[1].untyped_storage().data_ptr() in self.storages:
            args = (_eight_bits(args[0]), *args[1:])
        return func(*args, **(kwargs or {}))


def _reference_logits(folder, kind: str) -> torch.Tensor:
    """The dequantised model's logits, with int8's 8-bit activations where the engine's int8 kernel computes."""
    model = _dequantised_reference(folder, kind)
    transposed = any(getattr(m, "is_transposed", False) for m in model.modules())
    with torch.no_grad(), (_EightBitRows(model) if kind == "int8" and INT8_ACTIVATIONS and not transposed
                           else contextlib.nullcontext()):
        return model(torch.tensor([IDS])).logits[0]


TINY_KINDS = [k for k in QUANTIZATIONS if k not in ("int4-g64", "int4-g128")]  # the tiny experts are 32 wide


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "gpt_oss"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_quantised_slots_give_the_dequantised_models_logits(tiny_model, open_engine, family: str, kind: str) -> None:
    folder = tiny_model(family)
    want = _reference_logits(folder, kind)
    for budget in ("100%", "50%"):
        engine = open_engine(folder, budget=budget, quantize=kind, swapper=False)
        torch.testing.assert_close(engine.logits(IDS), want, rtol=1e-4, atol=1e-4)


def test_the_budget_counts_quantised_bytes_and_holds_more_experts(tiny_model, open_engine) -> None:
    folder = tiny_model("qwen3_moe")
    plain = open_engine(folder, budget="50%", swapper=False)
    nf4 = open_engine(folder, budget=plain.budget_bytes, quantize="nf4", swapper=False)
    assert nf4.total_expert_bytes < plain.total_expert_bytes / 3  # 4-bit codes and a scale per 64 values
    assert sum(c.capacity for c in nf4.committees) > sum(c.capacity for c in plain.committees)
    for engine in (plain, nf4):
        engine.logits(IDS * 4)
        assert engine.resident_expert_bytes() <= engine.budget_bytes  # the bytes the slots really hold
    spec = nf4.committees[0].spec
    assert nf4.committees[0].resident_bytes == nf4.committees[0].capacity * spec.expert_bytes
    report = fit_report(folder, "100%", quantize="nf4")
    assert report.total_expert_bytes == nf4.total_expert_bytes


def test_quantised_sizes() -> None:
    assert quantized_nbytes((128, 64), torch.bfloat16, None) == 128 * 64 * 2
    assert quantized_nbytes((128, 64), torch.bfloat16, "int8") == 128 * 64 + 128 * 2  # a bf16 scale per row
    assert quantized_nbytes((128, 64), torch.bfloat16, "nf4") == 128 * 64 // 2 + 128 * 64 // 64 * 4
    assert quantized_nbytes((64,), torch.bfloat16, "nf4") == 64 * 2  # biases stay as stored


def test_bad_quantisation_settings_are_refused(tiny_model) -> None:
    from expertswap.engine import Engine

    with pytest.raises(SettingsError, match="nf3"):
        Engine.load(tiny_model("olmoe"), quantize="nf3")
    with pytest.raises(UnsupportedArchitectureError, match="GPT-OSS"):
        Engine.load(tiny_model("gpt_oss"), quantize="nf4")


def test_mismatched_scales_are_an_error() -> None:
    codes = quantize({"w": torch.randn(16, 64)}, "nf4")
    codes["w.scale"] = codes["w.scale"][:3]  # scales of another tensor
    with pytest.raises((RuntimeError, ValueError)):
        dequantize(codes, "nf4", {"w": (16, 64)}, torch.float32)


def test_lowbit_computes_misses_from_the_nf4_copy_and_loads_nothing_while_decoding(tiny_model, open_engine) -> None:
    from expertswap.engine.moe.host_compute import HostExperts
    from expertswap.protocol import SamplingSettings

    folder = tiny_model("qwen3_moe")
    full = open_engine(folder, budget="100%", policy="lowbit", swapper=False)
    exact = open_engine(folder, budget="100%", swapper=False)
    torch.testing.assert_close(full.logits(IDS), exact.logits(IDS))  # nothing missing: exact
    engine = open_engine(folder, budget=full.minimum_budget_bytes, policy="lowbit", swapper=False)
    ids = engine.encode("the committee keeps what it needs and borrows the rest")
    loads = None
    for n, _ in enumerate(engine.generate(ids, SamplingSettings(max_new_tokens=12))):
        if n == 0:
            loads = engine.stats().expert_loads  # the prompt ran exact, loading what it needed
    stats = engine.stats()
    assert stats.low_precision > 0 and stats.expert_loads == loads
    # one layer by hand: a resident expert at full precision plus a missing one through transformers' own
    # experts forward on its dequantised nf4 copy
    committee = engine.committees[0]
    resident, missing = committee.resident_experts[0], next(
        e for e in range(committee.num_experts) if e not in committee.resident_experts)
    hidden = torch.randn(1, engine.model.config.hidden_size)
    index, weights = torch.tensor([[resident, missing]]), torch.tensor([[0.6, 0.4]])
    engine.runtime.allow_loads = False
    got = committee(hidden, index, weights)
    host = HostExperts(committee.inner, committee.spec)
    want = (0.6 * host.compute(committee.spec.plain(committee.store.read(committee.layer, resident)), hidden)
            + 0.4 * host.compute(committee.store.low_precision(committee.layer, missing), hidden))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _eight_bit_reference(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel computes, by hand: 8-bit rows times the codes, summed exactly, then the row scales."""
    return (_eight_bits(rows.double()) @ codes.double().t()) * scale.double()


@pytest.mark.skipif(not INT8_ACTIVATIONS, reason="torch here has no int8 x int8 kernel")
def test_int8_kernel_quantises_each_row_alone_and_sums_integers() -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 256) * 0.05
    packed = quantize({"w": weight}, "int8")
    codes, scale = packed["w.q"], packed["w.scale"]
    matrix = Int8Matrix(codes, scale)  # the store's codes as they lie: nothing packed, nothing copied
    rows = torch.randn(5, 256) * torch.tensor([[0.1], [1.0], [10.0], [3.0], [0.5]])
    rows[3] = 0  # a row of zeros stays zeros
    got = matrix(rows)
    torch.testing.assert_close(got.double(), _eight_bit_reference(rows, codes, scale), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], torch.zeros(96))
    assert torch.equal(got[2:3], matrix(rows[2:3]))  # a row's result does not depend on the rows beside it
    assert torch.equal(matrix(Int8Rows.of(rows[1:2])), got[1:2])  # rows quantised once for several matrices
    assert matrix.codes.data_ptr() == codes.data_ptr()


def test_int8_experts_go_to_the_int8_kernel_as_they_lie_on_the_cpu(tiny_model, open_engine) -> None:
    """No dequantising per token: the slots hold the codes and bf16 row scales the int8 kernel multiplies, and every
    budget gives the bits of 100% (same bytes, same kernel, each row computed alone). The store lends them to the
    slot that holds an expert, so an expert is held once, and gets them back when the expert leaves."""
    folder = tiny_model("qwen3_moe")
    full = open_engine(folder, budget="100%", quantize="int8", dtype="bfloat16", swapper=False)
    half = open_engine(folder, budget="50%", quantize="int8", dtype="bfloat16", swapper=False)
    logits = full.logits(IDS)
    committee = full.committees[0]
    weights = committee.storage.weights(0)
    assert isinstance(weights["gate_up_proj"], Int8Matrix) and weights["gate_up_proj"].scale.dtype == torch.bfloat16
    assert committee.resident_bytes == committee.capacity * committee.spec.expert_bytes  # codes + scales, no more
    assert full.store.host_bytes == 0  # every expert is in a slot: none is held twice
    assert torch.equal(half.logits(IDS), logits)
    small = half.committees[0]
    assert small.capacity < small.num_experts and small.storage.lends
    before = set(small.resident_experts)
    half.set_budget(half.minimum_budget_bytes)  # a shrink evicts residents: the store gets them back
    half.logits(IDS)
    after = set(small.resident_experts)
    assert before - after
    for expert in before | after:
        kept = half.store.kept(small.layer, expert)
        if expert in after:
            assert kept is None  # lent while resident
        else:  # given back as a fresh read gives it
            assert kept is not None
            fresh = quantize(small.spec.unpack(kept), "int8")
            assert all(torch.equal(kept[name], fresh[name]) for name in kept)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory):
    """Experts 128 wide, so that int4 groups of 64 and 128 tile their rows."""
    from tools.synthetic import build_model

    return build_model("qwen3_moe", tmp_path_factory.mktemp("wide"), hidden=128, intermediate=128, heads=4)


@pytest.mark.parametrize("kind", ["int4", "int4-g64", "int4-g128"])
def test_int4_experts_go_to_the_int4_kernel_and_every_budget_gives_the_same_bits(wide_model, open_engine,
                                                                                 kind: str) -> None:
    from expertswap.engine.weights.packed import Int4Matrix

    with torch.no_grad():
        want = _dequantised_reference(wide_model, kind)(torch.tensor([IDS])).logits[0]
    full = open_engine(wide_model, budget="100%", quantize=kind, swapper=False)
    half = open_engine(wide_model, budget="50%", quantize=kind, swapper=False)
    logits = full.logits(IDS)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(half.logits(IDS), logits)
    committee = full.committees[0]
    matrix = committee.storage.weights(0)["gate_up_proj"]
    assert isinstance(matrix, Int4Matrix) and matrix.group == {"int4": 32, "int4-g64": 64, "int4-g128": 128}[kind]
    assert committee.resident_bytes == committee.capacity * committee.spec.expert_bytes  # codes + scales, no more
    held = committee.storage.read(0)["gate_up_proj"]  # the kernel's own view of its matrix is the dequantised one
    shapes = {p.name: p.shape for p in committee.spec.params}
    store = dequantize(full.store.read(committee.layer, 0), kind, shapes, held.dtype)
    torch.testing.assert_close(held, store["gate_up_proj"], rtol=0, atol=1e-6)


def test_int4_groups_that_do_not_tile_the_experts_are_refused_before_a_read(tiny_model) -> None:
    from expertswap.engine import Engine

    with pytest.raises(UnsupportedArchitectureError, match="int4-g64 needs a multiple of 16 rows"):
        Engine.load(tiny_model("qwen3_moe"), quantize="int4-g64")


def _dense_int8_reference(folder) -> torch.Tensor:
    """``--quantize int8 --dense int8`` by hand: transformers' model with its experts and every matrix outside them
    but the routers (attention, shared experts, the output layer) quantised and dequantised, each of them fed
    8-bit activations as the int8 kernel sees them. In float64: a rounding step is a cliff, and float32's own
    rounding can push an activation over one (a test model showed it) where the engine's does not."""
    model = _dequantised_reference(folder, "int8").double()
    if model.lm_head.weight is model.get_input_embeddings().weight:  # the head gets its own copy, the embedding stays
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    dense = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and name.rpartition(".")[2] not in ("gate", "shared_expert_gate")]
    for module in dense:
        plain = quantize({"w": module.weight.data}, "int8")
        module.weight.data = dequantize(plain, "int8", {"w": tuple(module.weight.shape)}, module.weight.dtype)["w"]
    mode = _EightBitRows(model)
    mode.storages |= {m.weight.untyped_storage().data_ptr() for m in dense}
    with torch.no_grad(), mode:
        return model(torch.tensor([IDS])).logits[0].float()


@pytest.mark.skipif(not INT8_ACTIVATIONS, reason="torch here has no int8 x int8 kernel")
@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "mixtral"])
def test_dense_int8_quantises_every_matrix_outside_the_experts_but_the_routers(tiny_model, open_engine,
                                                                             family: str) -> None:
    folder = tiny_model(family)
    want = _dense_int8_reference(folder)
    full = open_engine(folder, budget="100%", quantize="int8", dense="int8", swapper=False)
    logits = full.logits(IDS)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert isinstance(full.compact.layers[0].attention.qkv.weight, Int8Matrix)
    half = open_engine(folder, budget="50%", quantize="int8", dense="int8", swapper=False)
    assert torch.equal(half.logits(IDS), logits)


def test_dense_int8_needs_quantised_experts_the_cpu_and_the_compact_step(tiny_model) -> None:
    from expertswap.engine import Engine

    with pytest.raises(SettingsError, match="goes with quantised experts"):
        Engine.load(tiny_model("olmoe"), dense="int8")
    with pytest.raises(SettingsError, match="unknown dense quantisation"):
        Engine.load(tiny_model("olmoe"), quantize="int8", dense="int4")
    with pytest.raises(UnsupportedArchitectureError, match="--dense int8 is not supported for"):
        Engine.load(tiny_model("deepseek_v3"), quantize="int8", dense="int8")
