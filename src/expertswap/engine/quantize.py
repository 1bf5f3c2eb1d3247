"""Experts quantised once, when read: int8 (a scale per row) or 4-bit nf4/fp4 (a scale per 64 values).

bitsandbytes does the arithmetic. A quantised expert is a dict of tensors like a plain one, each matrix
``name`` held as ``name.q`` (its codes) and ``name.scale``; biases stay as they are. The RAM tier and the
committee slots hold them so, and the budget counts their real bytes; the committee dequantises an
expert's matrices to the model's dtype when it computes. The result is the quantised model, exactly:
``exact`` gives the same output at every budget, but that output is not the original model's.
"""

from __future__ import annotations

import math

import torch

QUANTIZATIONS = ("int8", "nf4", "fp4")
LOW_PRECISION = "nf4"  # the copy the lowbit policy computes misses from
BLOCK = 64  # values per 4-bit scale


def _is_matrix(name: str, tensor: torch.Tensor) -> bool:
    return not name.endswith("_bias") and tensor.dim() >= 2


def quantized_nbytes(shape: tuple[int, ...], dtype: torch.dtype, kind: str | None) -> int:
    """Bytes one expert parameter takes quantised as ``kind`` (None: as stored)."""
    numel = math.prod(shape)
    if kind is None or len(shape) < 2:
        return numel * dtype.itemsize
    if kind == "int8":
        return numel + math.prod(shape[:-1]) * 4  # codes, a float32 scale per row
    return math.ceil(numel / 2) + math.ceil(numel / BLOCK) * 4  # two codes per byte, a float32 scale per block


def quantize(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """One expert's host tensors, quantised (see the module's docstring for the layout)."""
    import bitsandbytes.functional as bnb  # only a quantised load pays for importing it

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not _is_matrix(name, tensor):
            out[name] = tensor
        elif kind == "int8":
            codes, scales, _ = bnb.int8_vectorwise_quant(tensor.float().reshape(-1, tensor.shape[-1]))
            out[f"{name}.q"], out[f"{name}.scale"] = codes.reshape(tensor.shape), scales
        else:
            codes, state = bnb.quantize_4bit(tensor.contiguous(), blocksize=BLOCK, quant_type=kind)
            out[f"{name}.q"], out[f"{name}.scale"] = codes, state.absmax
    return out


def dequantize(tensors: dict[str, torch.Tensor], kind: str, shapes: dict[str, tuple[int, ...]],
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain tensors back, in ``dtype``; ``shapes`` gives each matrix's per-expert shape."""
    import bitsandbytes.functional as bnb

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".scale"):
            continue
        if not name.endswith(".q"):
            out[name] = tensor
            continue
        base = name[: -len(".q")]
        scale = tensors[f"{base}.scale"]
        shape = shapes[base]
        want = math.prod(shape[:-1]) if kind == "int8" else math.ceil(math.prod(shape) / BLOCK)
        if scale.numel() != want:
            raise ValueError(f"{base}: {scale.numel()} {kind} scales for a {tuple(shape)} matrix, expected {want}")
        if kind == "int8":
            plain = bnb.int8_vectorwise_dequant(tensor.reshape(-1, tensor.shape[-1]), scale).reshape(tensor.shape)
        else:
            state = bnb.QuantState(scale, shape=torch.Size(shape), blocksize=BLOCK, quant_type=kind, dtype=dtype)
            plain = bnb.dequantize_4bit(tensor, state)
        out[base] = plain.to(dtype)
    return out

