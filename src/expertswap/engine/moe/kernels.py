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

# Tall thin tiles: 4 output rows per program over up to 1,024 of the inner dimension per step, 2 warps, no
# software pipelining. Swept on an H200 (606 configurations, Granite-1B and OLMoE shapes): 1.5-1.65x the 16 x 256
# tiles on gate_up and 1.3-1.5x on down when resident (2.1-3.0 TB/s), the same on a miss (held at PCIe's
# 40-48 GB/s). Hits and misses share the configuration, so that they sum in the same order: the same bits.
_ROWS = 4
_MAX_COLS = 1024
_WARPS = 2
_STAGES = 1


@triton.jit
def _addresses(pair, index_ptr, fill_ptr, map_ptr, host_ptr, slots_base, stride, HAS_FILL: tl.constexpr):
    """Where a pair's matrix is read from and where it is written to on the way (0: nowhere)."""
    expert = tl.load(index_ptr + pair)
    at_slot = slots_base + tl.load(map_ptr + expert) * stride
    if HAS_FILL:
        filling = tl.load(fill_ptr + pair) >= 0
        return tl.where(filling, tl.load(host_ptr + expert), at_slot), tl.where(filling, at_slot, 0)
    return at_slot, at_slot * 0


@triton.jit
def _gate_up_kernel(x_ptr, index_ptr, fill_ptr, map_ptr, host_ptr, slots_base, stride, act_ptr,
                    HIDDEN: tl.constexpr, INNER: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                    HAS_FILL: tl.constexpr):
    pair = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    src_address, dst_address = _addresses(pair, index_ptr, fill_ptr, map_ptr, host_ptr, slots_base, stride, HAS_FILL)
    src = src_address.to(tl.pointer_type(dtype))
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
def _down_kernel(act_ptr, index_ptr, fill_ptr, map_ptr, host_ptr, slots_base, stride, weight_ptr, out_ptr,
                 HIDDEN: tl.constexpr, INNER: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                 HAS_FILL: tl.constexpr):
    pair = tl.program_id(0)
    dtype = act_ptr.dtype.element_ty
    src_address, dst_address = _addresses(pair, index_ptr, fill_ptr, map_ptr, host_ptr, slots_base, stride, HAS_FILL)
    src = src_address.to(tl.pointer_type(dtype))
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


def swiglu_pairs(x: torch.Tensor, index: torch.Tensor, fill: torch.Tensor | None, slot_map: torch.Tensor,
                 host: tuple[torch.Tensor, torch.Tensor], slots: tuple[torch.Tensor, torch.Tensor],
                 weights: torch.Tensor) -> torch.Tensor:
    """[k, H]: each routed pair's weighted SwiGLU output for one token ``x`` [H], routed to experts ``index`` [k].

    ``slots`` are the stacked [C, 2I, H] and [C, H, I] slot weights, ``slot_map`` [E] each expert's slot
    (for a missing one, the slot ``fill`` [k] says it is filling; None: nothing is missing) and ``host`` the
    addresses of each expert's two matrices in pinned host memory, int64 [E]: a pair filling a slot reads
    its expert from there and writes it into the slot on the way. ``weights`` [k] are the routing weights.
    """
    gate_up, down = slots
    pairs, hidden, intermediate = weights.numel(), x.numel(), down.shape[-1]
    assert gate_up.is_contiguous() and down.is_contiguous() and gate_up.shape[1:] == (2 * intermediate, hidden)
    index, weights = index.contiguous(), weights.contiguous()
    fills = fill if fill is not None else index  # not read without a fill
    act = torch.empty((pairs, intermediate), dtype=x.dtype, device=x.device)
    out = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)
    size = x.element_size()
    _gate_up_kernel[(pairs, triton.cdiv(intermediate, _ROWS))](
        x, index, fills, slot_map, host[0], gate_up.data_ptr(), gate_up[0].numel() * size, act, hidden, intermediate,
        _ROWS, _cols(hidden), HAS_FILL=fill is not None, num_warps=_WARPS, num_stages=_STAGES)
    _down_kernel[(pairs, triton.cdiv(hidden, _ROWS))](
        act, index, fills, slot_map, host[1], down.data_ptr(), down[0].numel() * size, weights, out, hidden,
        intermediate, _ROWS, _cols(intermediate), HAS_FILL=fill is not None, num_warps=_WARPS, num_stages=_STAGES)
    return out


def _cols(inner: int) -> int:
    """The inner dimension a program reads per step: all of it up to ``_MAX_COLS`` (a power of two, as Triton's
    ranges must be)."""
    return min(triton.next_power_of_2(inner), _MAX_COLS)


@triton.jit
def _sum_pairs_kernel(pairs_ptr, residual_ptr, out_ptr, HIDDEN: tl.constexpr, PAIRS: tl.constexpr,
                      BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < HIDDEN
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for pair in tl.static_range(PAIRS):  # in routing order, as every budget sums them
        total += tl.load(pairs_ptr + pair * HIDDEN + cols, mask=keep, other=0.0).to(tl.float32)
    out = total.to(dtype)
    if HAS_RESIDUAL:  # rounded as the add after it would round
        out = (tl.load(residual_ptr + cols, mask=keep, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(out_ptr + cols, out, mask=keep)


def sum_pairs(pairs: torch.Tensor, residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[1, H]: the sum over k of ``swiglu_pairs``' [k, H] (fp32, rounded once), one small kernel where torch's
    reduction took 3.8 us on an H200. With ``residual`` (h, out): ``h`` + the sum, into ``out`` [1, H]."""
    count, hidden = pairs.shape
    if residual is None:
        base, out = pairs, torch.empty((1, hidden), dtype=pairs.dtype, device=pairs.device)
    else:
        base, out = residual
        assert base.shape == out.shape == (1, hidden) and base.is_contiguous() and out.is_contiguous()
    _sum_pairs_kernel[(triton.cdiv(hidden, 256),)](pairs, base, out, hidden, count, BLOCK=256,
                                                   HAS_RESIDUAL=residual is not None)
    return out
