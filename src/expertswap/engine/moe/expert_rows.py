"""Routed experts computed one expert at a time on its own rows: the committee's CPU path.

On the CPU, transformers' grouped_mm runs a matmul for every slot of the layer, routed or not: at
top-2 of 8 that is four times the work a decode token needs (measured: a quarter of the default
model's token time), and its fp32 results change with how rows are grouped. Here only the routed
experts run, each on exactly the rows routed to it, from prepacked slot weights where packing
pays (see ``packed``), with the experts module's own gate function, biases and layout flags.

Each (token, k) pair's weighted output is kept apart and the caller sums over k exactly as
grouped_mm does (products in the model's dtype, one fp32 reduction over k in routing order). So a
result depends neither on which slot an expert sits in nor on how many passes a small committee
needs: every budget gives full residency's bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from expertswap.engine.weights.packed import Int4Matrix, Int8Matrix, Int8Rows, Matrix, linear, pack
from expertswap.engine.weights.quantize import INT4_GROUPS, int4_codes, packed_parts

Weights = Mapping[str, Matrix]  # one expert's weights as a forward takes them

_UP = ("gate_up_proj", "up_proj")


def supports_rows(inner: Any) -> bool:
    """Whether ``inner`` is a transformers fused-experts module whose math this path reproduces."""
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "act_fn")
    return all(hasattr(inner, name) for name in flags) and not inner.has_post_expert_norm


def up_name(inner: Any) -> str:
    return _UP[0] if inner.has_gate else _UP[1]


def slot_weights(inner: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's weights, matrices as [out, in] (transposed layouts turned); never written to, so not copied."""
    return {name: tensor if name.endswith("_bias") or not inner.is_transposed else tensor.t().contiguous()
            for name, tensor in tensors.items()}


def packed_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with the matrices packed (identical results, faster matmuls, ~200 us to pack)."""
    return {name: t if name.endswith("_bias") else pack(t) for name, t in weights.items()}


def kernel_matrices(tensors: dict[str, torch.Tensor], kind: str) -> Weights:
    """An int8 or int4 expert's matrices for their kernels, from its codes and scales as the store keeps them;
    biases kept."""
    out: dict[str, Matrix] = {}
    for name, tensor, scale in packed_parts(tensors):
        if scale is None:
            out[name] = tensor
        elif kind == "int8":
            out[name] = Int8Matrix(tensor.contiguous(), scale)
        else:
            out[name] = Int4Matrix.pack(int4_codes(tensor), INT4_GROUPS[kind], scale)
    return out


def routed_pairs(inner: Any, weights_of: Callable[[int], Weights], hidden: torch.Tensor,
                 index: list[list[int]], weights: torch.Tensor, int8_inputs: bool = False) -> torch.Tensor:
    """[T, k, H]: ``weights[t, j] * expert(index[t][j])(hidden[t])``, zero where the slot id is -1.

    ``weights_of(s)`` gives slot s's weights (from ``slot_weights``, maybe packed); ``index`` (slot
    ids) is on the host. Each product is cast to ``hidden``'s dtype, as transformers does: DeepSeek routes in
    float32 while a bf16 model computes its experts in bf16. ``int8_inputs``: the experts' first matrices are
    ``Int8Matrix`` that quantise their rows, so a decode token's row is quantised once for all of them (the same
    codes each would make).
    """
    rows, width = len(index), len(index[0]) if index else 0
    up, has_bias = up_name(inner), bool(inner.has_bias)

    def bias(weight: Weights, name: str) -> torch.Tensor | None:
        value = weight[f"{name}_bias"] if has_bias else None
        assert not isinstance(value, Int8Matrix | Int4Matrix)
        return value

    def expert(slot: int, x: torch.Tensor | Int8Rows) -> torch.Tensor:
        weight = weights_of(slot)
        y = linear(x, weight[up], bias(weight, up))
        y = inner._apply_gate(y) if inner.has_gate else inner.act_fn(y)
        return linear(y, weight["down_proj"], bias(weight, "down_proj"))

    if rows == 1:  # a decode token: no gathering
        row = Int8Rows.of(hidden) if int8_inputs and any(s >= 0 for s in index[0]) else hidden
        return torch.stack([(expert(s, row) * weights[0, j]).to(hidden.dtype) if s >= 0
                            else hidden.new_zeros(hidden.shape)
                            for j, s in enumerate(index[0])], dim=1)
    pairs = hidden.new_zeros(rows * width, hidden.shape[-1])
    flat = [s for row in index for s in row]
    for slot in sorted(set(flat) - {-1}):
        where = [i for i, s in enumerate(flat) if s == slot]
        take = torch.tensor(where)
        pairs[take] = (expert(slot, hidden[take // width]) * weights.reshape(-1)[take, None]).to(pairs.dtype)
    return pairs.view(rows, width, -1)
