"""The Triton programs behind ``fused`` (imported only where Triton is: CUDA machines)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, groups, stride_row, stride_group, width, eps, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    row, group = program // groups, program % groups
    cols = tl.arange(0, BLOCK)
    keep = cols < width
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_row + group * stride_group + cols, mask=keep, other=0.0).to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=keep, other=0.0)
    tl.store(out_ptr + program * width + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=keep)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, width] or [T, G, width] (last dimension contiguous, a view of a wider row allowed)."""
    width = x.shape[-1]
    assert x.stride(-1) == 1 and weight.shape == (width,) and x.dim() in (2, 3)
    rows, groups = x.shape[0], x.shape[1] if x.dim() == 3 else 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel[(rows * groups,)](x, weight, out, groups, x.stride(0), x.stride(1) if x.dim() == 3 else 0,
                                       width, eps, BLOCK=triton.next_power_of_2(width))
    return out


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, positions, stride_head, stride_pos, DIM: tl.constexpr):
    program = tl.program_id(0)
    head, position = program // positions, program % positions
    cols = tl.arange(0, DIM)
    half = DIM // 2
    base = x_ptr + head * stride_head + position * stride_pos
    dtype = out_ptr.dtype.element_ty
    x = tl.load(base + cols).to(tl.float32)
    partner = tl.load(base + tl.where(cols < half, cols + half, cols - half)).to(tl.float32)
    rotated = tl.where(cols < half, -partner, partner)
    cos = tl.load(cos_ptr + position * DIM + cols).to(tl.float32)
    sin = tl.load(sin_ptr + position * DIM + cols).to(tl.float32)
    # eager rounds each product to the dtype, then the sum
    total = (x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)
    tl.store(out_ptr + program * DIM + cols, total.to(dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, D] (last dimension contiguous), cos/sin [T, D] contiguous: a new contiguous [heads, T, D]."""
    heads, positions, dim = x.shape
    assert x.stride(-1) == 1 and cos.shape == sin.shape == (positions, dim) and dim & (dim - 1) == 0
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # no fused multiply-add: eager rounds each product before the sum
    _rotate_kernel[(heads * positions,)](x, cos, sin, out, positions, x.stride(0), x.stride(1), DIM=dim,
                                         enable_fp_fusion=False)
    return out
