"""bf16 weights on the CPU kept in oneDNN's blocked layout, so a matmul does not re-pack them on every call.

A plain bf16 ``F.linear`` on the CPU reorders its weight for oneDNN each time it runs. At one token
per step that reorder is most of the work: over 100 distinct weights from RAM, plain reached
18 GB/s and prepacked 45 GB/s on the 2-core dev machine (results identical, bit for bit). The
weight is packed once, at load (non-expert linears) or when an expert enters a slot, and the
plain copy is dropped, so memory does not grow.

int8 weights on the CPU are multiplied by torch's int8 x int8 -> int32 kernel (``_int_mm``, oneDNN's) as their codes
lie, as llama.cpp multiplies Q8_0: each row of activations is quantised alone to symmetric 8 bits (its own scale),
the products are summed as integers, exactly, then scaled by the two scales. Integer sums are exact whatever the
kernel's order or blocking, so a row's result never depends on the rows beside it (prefill, decode and every budget
give the same bits), and nothing is prepacked: an expert costs nothing to bring into a slot beyond reading its codes.
fbgemm's ``quantized::linear_dynamic``, used before, needed its own packed copy of each matrix, 13 ms to make for a
2048x2048 matrix and 28 ms to undo, on every miss; its decode speed with the weights in RAM was within 8%. Where the
kernel does not sum exactly (a CPU whose int8 path pairs products in 16 bits, checked once at import) or is missing
(``INT8_ACTIVATIONS`` false), the weight-only kernel (``_weight_int8pack_mm``) multiplies the codes by the
activations as they are.

int4 experts are multiplied by ``_weight_int4pack_mm_for_cpu`` as they lie (96-102 us, groups of 32-128). The
int4 kernel's layout depends on the CPU's vector width, so it is made when an expert enters a slot
(``Int4Matrix.pack``), from the portable two-codes-a-byte form the store keeps.

These are torch's private ops (checked with torch 2.13); ``tests/test_compat.py`` fails loudly if a
torch upgrade removes them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from expertswap.engine.weights.compat import linear_pointwise, mkldnn_bf16_supported, reorder_linear_weight
from expertswap.engine.weights.host_memory import drop_file_pages


def packing_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Only bf16 on a CPU whose oneDNN has bf16 kernels (fp32 matmuls go to MKL, which needs no packing)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in oneDNN's layout for a matmul with a few rows."""
    return reorder_linear_weight(weight)


def _int_mm_is_exact() -> bool:
    """Whether torch's int8 x int8 kernel is here and sums exactly at the codes' extremes (a kernel that pairs
    products in 16 bits, on CPUs without VNNI, would saturate: 2 x 127 x 127 fits, 2 x 255 x 127 does not)."""
    edge = torch.tensor([127, -127] * 64, dtype=torch.int8)
    rows = torch.stack([edge.abs(), -edge.abs(), edge, torch.arange(-64, 64, dtype=torch.int8) * 2 - 1])
    try:
        return torch.equal(torch._int_mm(rows, rows.t()), rows.int() @ rows.int().t())
    except (RuntimeError, AttributeError):
        return False


INT8_ACTIVATIONS = _int_mm_is_exact()
_TINY = torch.finfo(torch.float32).tiny
# oneDNN's kernel takes one row of a 2048x2048 matrix in 35 us and 2 to 8 rows in 250-280 us (2 cores): a few rows
# go one at a time
_ROW_AT_A_TIME = 8


class Int8Rows(NamedTuple):
    """Rows of activations quantised for the int8 kernel: symmetric 8-bit codes and a float32 step per row."""

    codes: torch.Tensor
    step: torch.Tensor
    dtype: torch.dtype  # what the products come back as

    @classmethod
    def of(cls, rows: torch.Tensor) -> Int8Rows:
        """Each row alone: its largest magnitude becomes 127 (a row of zeros stays zeros)."""
        x = rows.float()
        step = x.abs().amax(dim=-1, keepdim=True).clamp_(min=_TINY) / 127
        return cls(torch.round(x / step).to(torch.int8), step, rows.dtype)


class Int8Matrix(NamedTuple):
    """An [out, in] weight as int8 ``codes`` with a ``scale`` per output row (the activations' dtype), multiplied as
    they lie (module docstring)."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        """What the budget counts: a byte per code and a scale per row."""
        return self.codes.nbytes + self.scale.nbytes

    def __call__(self, rows: torch.Tensor | Int8Rows) -> torch.Tensor:
        """``rows`` times the matrix; rows already quantised (``Int8Rows``) when several matrices share them."""
        if not INT8_ACTIVATIONS:
            assert isinstance(rows, torch.Tensor)
            return torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scale.to(rows.dtype))
        quantised = rows if isinstance(rows, Int8Rows) else Int8Rows.of(rows)
        codes, weight = quantised.codes, self.codes.t()
        if 1 < codes.shape[0] <= _ROW_AT_A_TIME:  # the same integer sums (exact), one row's fast path each
            sums = torch.cat([torch._int_mm(row, weight) for row in codes.split(1)])
        else:
            sums = torch._int_mm(codes, weight)
        return torch.mul(sums, quantised.step).mul_(self.scale.float()).to(quantised.dtype)

    def plain(self) -> torch.Tensor:
        """The weight the kernel multiplies by (for checks and norms)."""
        return (self.codes.float() * self.scale.float()[:, None]).to(self.scale.dtype)


class Int4Matrix(NamedTuple):
    """An [out, in] weight in the CPU int4 kernel's layout, with a (scale, zero) per ``group`` values of a row."""

    packed: torch.Tensor
    group: int
    scale_zeros: torch.Tensor  # [in / group, out, 2], the activations' dtype

    @classmethod
    def pack(cls, codes: torch.Tensor, group: int, scale_zeros: torch.Tensor) -> Int4Matrix:
        """From [out, in] int32 codes 0..15 (this CPU's layout is made here, about 4 ms per 2048x2048)."""
        return cls(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), group, scale_zeros)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zeros.nbytes

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_zeros)

    def plain(self) -> torch.Tensor:
        """The matrix the kernel multiplies by, read through the kernel itself (its layout is the CPU's): a
        matmul with the identity, for checks only."""
        inputs = self.scale_zeros.shape[0] * self.group
        return self(torch.eye(inputs, dtype=self.scale_zeros.dtype)).t()


Matrix = torch.Tensor | Int8Matrix | Int4Matrix


def integer_kernel_pays(kind: str | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Where int8 and int4 experts are multiplied as they lie: the CPU, in bf16 or float32 (the kernels' dtypes)."""
    return (kind is not None and (kind == "int8" or kind.startswith("int4")) and device.type == "cpu"
            and dtype in (torch.bfloat16, torch.float32))


def linear(x: torch.Tensor | Int8Rows, weight: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a plain, a packed, an int8 or an int4 weight (``Int8Rows``: rows quantised for int8 already,
    one row at a time)."""
    if isinstance(x, Int8Rows):
        assert isinstance(weight, Int8Matrix) and x.codes.shape[0] == 1
        y = weight(x)
        return y if bias is None else y + bias
    if isinstance(weight, Int8Matrix | Int4Matrix):
        y = weight(x.reshape(-1, x.shape[-1]))
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias
    return packed_linear(x, weight, bias) if weight.is_mkldnn else F.linear(x, weight, bias)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a packed weight; any leading shape."""
    rows = x.reshape(-1, x.shape[-1])
    y = linear_pointwise(rows, weight, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is packed; ``weight`` stays readable for its shape and dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = pack(linear.weight)  # a plain attribute: an opaque tensor cannot be a Parameter
        self.bias = linear.bias
        drop_file_pages([linear.weight.detach()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 ``nn.Linear`` whose weight no other module shares; returns how many."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and owners[id(child.weight)] == 1:
                setattr(parent, name, PackedLinear(child))  # a tied lm_head keeps the embedding's plain copy
                count += 1
    return count
