"""One kernel each for the decode step's small ops on CUDA: RMSNorm and the rotary embedding.

At batch 1 a layer is launch-bound: transformers' RMSNorm is seven kernels (cast, square, mean, add,
rsqrt, multiply, scale) and the rotary embedding six per tensor, for a few kilobytes each; a layer ran
about 80 kernels. These do each in one, rounding where transformers rounds: the rotary embedding gives
the same bits as the eager code; RMSNorm's mean is summed in another order (fp32), so it may differ in
the last bit of a bf16 value. Prefill and decode both use them, so every budget sees the same kernels.
"""

from __future__ import annotations

import importlib.util

import torch


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernels serve here: CUDA, with Triton (it ships with torch's CUDA builds), in the
    dtypes of the CUDA-graph step (fp32 keeps transformers' own ops)."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("triton") is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension, as transformers' RMSNorm rounds it."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.rms_norm(x, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [heads, T, D] and cos/sin [T, D], bit for bit as eager."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.rotate(x, cos, sin)
