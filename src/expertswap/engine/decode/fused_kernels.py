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


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    keep = cols < width
    dtype = out_ptr.dtype.element_ty
    total = (tl.load(x_ptr + cols, mask=keep, other=0.0).to(tl.float32) +
             tl.load(delta_ptr + cols, mask=keep, other=0.0).to(tl.float32)).to(dtype)
    tl.store(sum_ptr + cols, total, mask=keep)
    x = total.to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=keep, other=0.0)
    tl.store(out_ptr + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=keep)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: ``x + delta`` [1, width] and its RMSNorm, both contiguous."""
    width = x.shape[-1]
    assert x.shape == delta.shape == (1, width) and x.is_contiguous() and delta.is_contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(1,)](x, delta, weight, total, out, width, eps, BLOCK=triton.next_power_of_2(width))
    return total, out


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


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, position_ptr, max_ptr, sum_ptr, acc_ptr, splits, stride_kv_head,
                             scale, GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr):
    head, split = tl.program_id(0), tl.program_id(1)
    position = tl.load(position_ptr)
    keys = split * BLOCK + tl.arange(0, BLOCK)
    seen = keys <= position  # a block wholly past the position reads nothing
    dims = tl.arange(0, DIM)
    q = tl.load(q_ptr + head * DIM + dims).to(tl.float32)
    offsets = (head // GROUP) * stride_kv_head + keys[:, None] * DIM + dims[None, :]
    k = tl.load(k_ptr + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
    scores = tl.where(seen, tl.sum(k * q[None, :], axis=1) * scale, -float("inf"))
    top = tl.max(scores, axis=0)
    weights = tl.exp(scores - tl.where(top == -float("inf"), 0.0, top))
    v = tl.load(v_ptr + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
    at = head * splits + split
    tl.store(max_ptr + at, top)
    tl.store(sum_ptr + at, tl.sum(weights, axis=0))
    tl.store(acc_ptr + at * DIM + dims, tl.sum(weights[:, None] * v, axis=0))


@triton.jit
def _combine_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, splits, DIM: tl.constexpr, CHUNK: tl.constexpr):
    head = tl.program_id(0)
    top = -float("inf")  # the first block always holds position 0: the maximum is finite
    for start in range(0, splits, CHUNK):
        parts = start + tl.arange(0, CHUNK)
        top = tl.maximum(top, tl.max(tl.load(max_ptr + head * splits + parts, mask=parts < splits,
                                             other=-float("inf")), axis=0))
    dims = tl.arange(0, DIM)
    total = 0.0
    acc = tl.zeros([DIM], dtype=tl.float32)
    for start in range(0, splits, CHUNK):
        parts = start + tl.arange(0, CHUNK)
        used = parts < splits
        scale = tl.exp(tl.load(max_ptr + head * splits + parts, mask=used, other=-float("inf")) - top)
        total += tl.sum(scale * tl.load(sum_ptr + head * splits + parts, mask=used, other=0.0), axis=0)
        partial = tl.load(acc_ptr + (head * splits + parts[:, None]) * DIM + dims[None, :], mask=used[:, None],
                          other=0.0)
        acc += tl.sum(scale[:, None] * partial, axis=0)
    tl.store(out_ptr + head * DIM + dims, (acc / total).to(out_ptr.dtype.element_ty))


_KEYS_PER_PROGRAM = 64


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per head, q [heads, 1, D], over a cache's keys and values [1, kv_heads, capacity, D] up to and
    including ``position`` (a device tensor): [1, heads * D]. Split over the cache in blocks, then combined."""
    heads, _, dim = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    assert q.is_contiguous() and keys.is_contiguous() and values.is_contiguous() and dim & (dim - 1) == 0
    splits = triton.cdiv(capacity, _KEYS_PER_PROGRAM)
    maxima = torch.empty((heads, splits), dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxima)
    acc = torch.empty((heads, splits, dim), dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(heads, splits)](q, keys, values, position, maxima, sums, acc, splits, keys.stride(1),
                                              scale, GROUP=heads // kv_heads, DIM=dim, BLOCK=_KEYS_PER_PROGRAM)
    out = torch.empty((1, heads * dim), dtype=q.dtype, device=q.device)
    _combine_kernel[(heads,)](maxima, sums, acc, out, splits, DIM=dim, CHUNK=16)
    return out


@triton.jit
def _rms(x, p, w_base, cols, partner, keep, r, dtype):
    """x and its rotate_half partner p normed by the factor r, each as the RMSNorm kernel rounds it."""
    w_x = tl.load(w_base + cols, mask=keep, other=0.0).to(tl.float32)
    w_p = tl.load(w_base + partner, mask=keep, other=0.0).to(tl.float32)
    return ((w_x * (x.to(tl.float32) * r).to(dtype).to(tl.float32)).to(dtype),
            (w_p * (p.to(tl.float32) * r).to(dtype).to(tl.float32)).to(dtype))


@triton.jit
def _decode_qkv_kernel(qkv_ptr, norm_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, position_ptr,
                       stride_kv_head, eps, clip, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, ROWS: tl.constexpr,
                       DIM: tl.constexpr, NORM: tl.constexpr):
    # program 0: q into q_ptr; program 1: k and v into the caches at the position. Each as [heads, DIM], in the
    # order the family's attention takes: a norm over the whole projection, the clip, a norm per head, rotary.
    is_q = tl.program_id(0) == 0
    heads = tl.where(is_q, HEADS, KV_HEADS)
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, DIM)[None, :]
    half = DIM // 2
    partner = tl.where(cols < half, cols + half, cols - half)  # rotate_half's other element
    keep = (rows < heads) & (cols < DIM)
    base = qkv_ptr + tl.where(is_q, 0, HEADS * DIM)
    dtype = q_ptr.dtype.element_ty
    x = tl.load(base + rows * DIM + cols, mask=keep, other=0.0)
    p = tl.load(base + rows * DIM + partner, mask=keep, other=0.0)
    if NORM == 1:  # over the whole projection (OLMoE)
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / (heads * DIM) + eps)
        x, p = _rms(x, p, norm_ptr + tl.where(is_q, 0, HEADS * DIM) + rows * DIM, cols, partner, keep, r, dtype)
    x = tl.minimum(tl.maximum(x.to(tl.float32), -clip), clip).to(dtype)
    p = tl.minimum(tl.maximum(p.to(tl.float32), -clip), clip).to(dtype)
    if NORM == 2:  # over each head (Qwen3)
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / DIM + eps)[:, None]
        x, p = _rms(x, p, norm_ptr + tl.where(is_q, 0, DIM) + rows * 0, cols, partner, keep, r, dtype)
    cos = tl.load(cos_ptr + cols).to(tl.float32)
    sin = tl.load(sin_ptr + cols).to(tl.float32)
    p_f = p.to(tl.float32)
    rotated = tl.where(cols < half, -p_f, p_f)
    # eager rounds each product to the dtype, then the sum
    out = ((x.to(tl.float32) * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(q_ptr + rows * DIM + cols, out, mask=(rows < tl.where(is_q, HEADS, 0)) & (cols < DIM))
    kv = (rows < tl.where(is_q, 0, KV_HEADS)) & (cols < DIM)
    at = rows * stride_kv_head + tl.load(position_ptr) * DIM + cols
    tl.store(k_cache_ptr + at, out, mask=kv)
    v = tl.load(qkv_ptr + (HEADS + KV_HEADS) * DIM + rows * DIM + cols, mask=kv, other=0.0)
    tl.store(v_cache_ptr + at, tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip).to(dtype), mask=kv)


def decode_qkv(qkv: torch.Tensor, norms: torch.Tensor | None, per_head: bool, eps: float, clip: float | None,
               cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               position: torch.Tensor, heads: int) -> torch.Tensor:
    """One token's fused projection qkv [1, (heads + 2 kv_heads) D]: q [heads, 1, D] returned, k and v written
    into the caches [1, kv_heads, capacity, D] at ``position``. ``norms``: the q and k norms' weights one after
    the other (per head: [2 D], else [(heads + kv_heads) D]), or None; ``clip``: the family's clip_qkv."""
    _, kv_heads, _, dim = k_cache.shape
    assert qkv.is_contiguous() and qkv.shape == (1, (heads + 2 * kv_heads) * dim) and k_cache.is_contiguous()
    assert v_cache.is_contiguous() and cos.shape == sin.shape == (1, dim) and dim & (dim - 1) == 0
    q = torch.empty((heads, 1, dim), dtype=qkv.dtype, device=qkv.device)
    mode = 0 if norms is None else 2 if per_head else 1
    # no fused multiply-add: eager rounds each product before the sum
    _decode_qkv_kernel[(2,)](qkv, norms if norms is not None else qkv, cos.contiguous(), sin.contiguous(), q,
                             k_cache, v_cache, position, k_cache.stride(1), eps,
                             float("inf") if clip is None else float(clip), HEADS=heads, KV_HEADS=kv_heads,
                             ROWS=triton.next_power_of_2(max(heads, kv_heads)), DIM=dim, NORM=mode,
                             enable_fp_fusion=False)
    return q
