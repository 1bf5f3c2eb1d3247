"""Triton kernels for one decode token's routed experts, each read wherever it lies: a slot or pinned host memory.

A batch-1 expert is two matrix-vector products, bound by the bytes of its weights. Each routed pair gets an
address per matrix, either its slot's in device memory or its pinned host copy's (unified addressing: the
GPU reads host memory over PCIe, with no copy and no host in the loop). The same program does the same
arithmetic on the same bytes wherever they are, so a miss gives the bits a hit gives. A pair whose expert is
being brought in also has a destination: the program writes each tile it reads into the victim slot, so the
expert is resident for the next token and its bytes crossed PCIe once.

Gate and up are computed together (rows [:I] and [I:] of the [2I, H] matrix), SwiGLU applied in the
epilogue; the down projection is scaled by the routing weight. Accumulation is fp32 and each product is
rounded to the model's dtype where transformers rounds it (after each linear, the activation, the product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 16  # output rows per program: enough programs in flight to hide PCIe latency on a miss
_COLS = 256  # inner dimension per step: 512 contiguous bytes per row of bf16


@triton.jit
def _gate_up_kernel(x_ptr, src_ptr, dst_ptr, act_ptr, HIDDEN: tl.constexpr, INNER: tl.constexpr,
                    ROWS: tl.constexpr, COLS: tl.constexpr):
    pair = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    src = tl.load(src_ptr + pair).to(tl.pointer_type(dtype))
    dst_address = tl.load(dst_ptr + pair)
    dst = dst_address.to(tl.pointer_type(dtype))
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < INNER
    gate = tl.zeros([ROWS], dtype=tl.float32)
    up = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, HIDDEN, COLS):
        cols = start + tl.arange(0, COLS)
        col_ok = cols < HIDDEN
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        offsets = rows[:, None] * HIDDEN + cols[None, :]
        w_gate = tl.load(src + offsets, mask=mask, other=0.0)
        w_up = tl.load(src + offsets + INNER * HIDDEN, mask=mask, other=0.0)
        if dst_address != 0:
            tl.store(dst + offsets, w_gate, mask=mask)
            tl.store(dst + offsets + INNER * HIDDEN, w_up, mask=mask)
        gate += tl.sum(w_gate.to(tl.float32) * x[None, :], axis=1)
        up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
    gate = gate.to(dtype).to(tl.float32)
    active = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    product = active * up.to(dtype).to(tl.float32)
    tl.store(act_ptr + pair * INNER + rows, product.to(dtype), mask=row_ok)


@triton.jit
def _down_kernel(act_ptr, src_ptr, dst_ptr, weight_ptr, out_ptr, HIDDEN: tl.constexpr, INNER: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr):
    pair = tl.program_id(0)
    dtype = act_ptr.dtype.element_ty
    src = tl.load(src_ptr + pair).to(tl.pointer_type(dtype))
    dst_address = tl.load(dst_ptr + pair)
    dst = dst_address.to(tl.pointer_type(dtype))
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < HIDDEN
    total = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, INNER, COLS):
        cols = start + tl.arange(0, COLS)
        col_ok = cols < INNER
        mask = row_ok[:, None] & col_ok[None, :]
        a = tl.load(act_ptr + pair * INNER + cols, mask=col_ok, other=0.0).to(tl.float32)
        offsets = rows[:, None] * INNER + cols[None, :]
        w = tl.load(src + offsets, mask=mask, other=0.0)
        if dst_address != 0:
            tl.store(dst + offsets, w, mask=mask)
        total += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    weight = tl.load(weight_ptr + pair).to(dtype).to(tl.float32)
    scaled = total.to(dtype).to(tl.float32) * weight
    tl.store(out_ptr + pair * HIDDEN + rows, scaled.to(dtype), mask=row_ok)


def swiglu_pairs(x: torch.Tensor, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                 weights: torch.Tensor, intermediate: int) -> torch.Tensor:
    """[k, H]: each routed pair's weighted SwiGLU output for one token ``x`` [H].

    ``gate_up`` and ``down`` are (source, destination) addresses per pair, int64 [k] on the device: a source
    is a [2I, H] or [H, I] row-major matrix of ``x``'s dtype; a destination 0 means none, else the matrix is
    also written there. ``weights`` [k] are the routing weights.
    """
    pairs, hidden = weights.numel(), x.numel()
    act = torch.empty((pairs, intermediate), dtype=x.dtype, device=x.device)
    out = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(pairs, triton.cdiv(intermediate, _ROWS))](x, gate_up[0], gate_up[1], act, hidden, intermediate,
                                                               _ROWS, _COLS)
    _down_kernel[(pairs, triton.cdiv(hidden, _ROWS))](act, down[0], down[1], weights, out, hidden, intermediate,
                                                      _ROWS, _COLS)
    return out
