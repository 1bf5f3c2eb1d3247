"""The private torch/transformers hooks (engine/weights/compat.py) against the versions they were checked with."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn

from expertswap.engine.weights import compat


@pytest.mark.parametrize("package", sorted(compat.CHECKED))
def test_installed_versions_are_the_ones_the_hooks_were_checked_against(package: str) -> None:
    installed = importlib.metadata.version(package).split("+")[0]
    assert installed == compat.CHECKED[package], (
        f"{package} {installed} is installed but weights/compat.py was checked against {compat.CHECKED[package]}: "
        "re-check every hook there, then update CHECKED")


def test_foreach_norm_matches_the_plain_norm() -> None:
    tensors = [torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(3)]
    for got, t in zip(compat.foreach_norm(tensors), tensors, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, t.float().norm())


def test_after_init_runs_its_hook_only_inside_the_block() -> None:
    seen: list[nn.Module] = []
    with compat.after_init(nn.Linear, seen.append):
        inside = nn.Linear(2, 2)
    nn.Linear(2, 2)
    assert seen == [inside]


@pytest.mark.skipif(not compat.mkldnn_bf16_supported(), reason="this CPU's oneDNN has no bf16 kernels")
def test_reordered_weights_give_the_plain_linear() -> None:
    weight, x = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(compat.linear_pointwise(x, compat.reorder_linear_weight(weight), None),
                               torch.nn.functional.linear(x, weight))


def test_transformers_still_reads_the_config_and_module_flags(tiny_model) -> None:
    """The experts modules still carry the flags we set, under the names we set them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("olmoe"))
    experts = model.model.layers[0].mlp.experts
    assert compat.experts_implementation(model.config) is not None
    assert hasattr(experts, "_is_expert_parallel")
    compat.set_expert_parallel(experts, True)
    assert experts._is_expert_parallel is True


@pytest.mark.parametrize("op", ["aten::_int_mm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                                "aten::_convert_weight_to_int4pack_for_cpu"])
def test_the_integer_kernels_are_still_there(op: str) -> None:
    """packed.py's int8 and int4 kernels are torch's private ops: tests/test_quantize.py checks their arithmetic, this
    names the one a torch upgrade removed."""
    namespace, name = op.split("::")
    assert hasattr(getattr(torch.ops, namespace), name), f"torch {torch.__version__} has no {op}"


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An int8 kernel as CPUs without VNNI run one: activations shifted to u8, products paired in saturating 16-bit
    sums, the shift taken back out."""
    shifted = a.long() + 128
    products = shifted[:, :, None] * b.long()[None]  # [M, K, N]
    pairs = products.view(a.shape[0], -1, 2, b.shape[1]).sum(2).clamp(-32768, 32767)
    return (pairs.sum(1) - 128 * b.long().sum(0)).int()


def test_int8_activations_fall_back_where_the_kernel_would_saturate(monkeypatch: pytest.MonkeyPatch) -> None:
    from expertswap.engine.weights import packed

    assert packed._int_mm_is_exact() == packed.INT8_ACTIVATIONS
    small = torch.randint(-20, 21, (3, 64), dtype=torch.int8)
    assert torch.equal(_saturating_int_mm(small, small.t()), small.int() @ small.int().t())  # exact where it fits
    monkeypatch.setattr(torch, "_int_mm", _saturating_int_mm)
    assert not packed._int_mm_is_exact()
