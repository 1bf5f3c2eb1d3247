"""One kernel each for the decode step's small ops on CUDA: RMSNorm, the rotary embedding, one query's q/k/v and
attention, a residual add with the norm after it.

At batch 1 a layer is launch-bound: transformers' RMSNorm is seven kernels (cast, square, mean, add,
rsqrt, multiply, scale) and the rotary embedding six per tensor, for a few kilobytes each; a layer ran
about 80 kernels. These do each in one, rounding where transformers rounds: the rotary embedding gives
the same bits as the eager code; RMSNorm's mean is summed in another order (fp32), so it may differ in
the last bit of a bf16 value. Prefill and decode both use them, so every budget sees the same kernels. They
serve where ``device.triton_serves`` says.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension, as transformers' RMSNorm rounds it."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.rms_norm(x, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [heads, T, D] and cos/sin [T, D], bit for bit as eager."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.rotate(x, cos, sin)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one token's q [heads, 1, D] over a cache [1, kv_heads, capacity, D] up to ``position`` (a
    device tensor), [1, heads * D]: reads only the filled blocks, where attention under a mask reads them all."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.decode_attention(q, keys, values, position, scale)


def decode_qkv(qkv: torch.Tensor, norms: torch.Tensor | None, per_head: bool, eps: float, clip: float | None,
               cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               position: torch.Tensor, heads: int) -> torch.Tensor:
    """One token's q [heads, 1, D] from its fused projection, normed, clipped and rotated as the family does, its
    k and v written into the caches at ``position`` (a device tensor): one kernel where the norms, rotations and
    cache writes were five."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.decode_qkv(qkv, norms, per_head, eps, clip, cos, sin, k_cache, v_cache, position, heads)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMSNorm of its sum, one row: (``x + delta``, its norm), rounded as the two apart."""
    from expertswap.engine.decode import fused_kernels

    return fused_kernels.add_rms_norm(x, delta, weight, eps)
