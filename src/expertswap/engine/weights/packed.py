"""bf16 weights on the CPU kept in oneDNN's blocked layout, so a matmul does not re-pack them on every call.

A plain bf16 ``F.linear`` on the CPU reorders its weight for oneDNN each time it runs. At one token
per step that reorder is most of the work: over 100 distinct weights from RAM, plain reached
18 GB/s and prepacked 45 GB/s on the 2-core dev machine (results identical, bit for bit). The
weight is packed once, at load (non-expert linears) or when an expert enters a slot, and the
plain copy is dropped, so memory does not grow.

int8 experts on the CPU are multiplied by torch's int8 x int8 kernel (fbgemm on x86, ``quantized::linear_dynamic``),
as llama.cpp multiplies Q8_0: each row of activations is quantised to 7 bits (its own scale and zero point, so a
row's result never depends on the rows beside it: prefill, decode and every budget give the same bits), the
products are summed as integers, then scaled. The weight-only kernel (``_weight_int8pack_mm``) converts every
code to a float and is compute-bound on a few cores: on the 2-core dev machine a row times a 2048x2048 matrix took
150 us against its 250 us (bf16 packed: 330 us). Seven bits, not eight: on CPUs without VNNI the kernel's 16-bit
pair sums would saturate at eight, so seven keeps the result the same on every x86 CPU. The int8 model is thus
int8 weights and 7-bit activations (its quality on the default model: docs/quantisation.md).
Where torch has no such kernel (``INT8_ACTIVATIONS`` false), the weight-only kernel multiplies the codes.

int4 experts are multiplied by ``_weight_int4pack_mm_for_cpu`` as they lie (96-102 us, groups of 32-128). The
int4 kernel's layout depends on the CPU's vector width, so it is made when an expert enters a slot
(``Int4Matrix.pack``), from the portable two-codes-a-byte form the store keeps.

These are torch's private or deprecated ops (checked with torch 2.13); ``tests/test_compat.py`` fails loudly if a
torch upgrade removes them.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

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


def _int8_activations() -> bool:
    """Whether torch here has the int8 x int8 kernel (its quantised engine is fbgemm's, as on every x86 build)."""
    return torch.backends.quantized.engine in ("x86", "fbgemm")


INT8_ACTIVATIONS = _int8_activations()
_SEVEN_BITS = True  # ``reduce_range``: activations in 0..127 (see the module's docstring)


class Int8Matrix(NamedTuple):
    """An [out, in] weight as int8 codes with a ``scale`` per output row (the activations' dtype), held in the
    int8 kernel's own prepacked form where there is one (``weight``), else as the codes."""

    weight: Any  # fbgemm's prepacked weight, or the [out, in] int8 codes
    scale: torch.Tensor
    inputs: int

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor) -> Int8Matrix:
        """From the codes and scales the store keeps (the kernel copies them into its layout)."""
        if not INT8_ACTIVATIONS:
            return cls(codes, scale, codes.shape[1])
        zeros = torch.zeros(codes.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks its quantised tensors deprecated (tests/test_compat.py)
            warnings.simplefilter("ignore")
            quantised = torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0)
            return cls(torch.ops.quantized.linear_prepack(quantised, None), scale, codes.shape[1])

    @property
    def nbytes(self) -> int:
        """What the budget counts: a byte per code and a scale per row (the kernel's own layout adds a few bytes
        a row: column sums and the scales in float64)."""
        return self.scale.numel() * self.inputs + self.scale.nbytes

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if not INT8_ACTIVATIONS:
            return torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        x = rows.float()  # one row per call: the kernel quantises all the rows it is given with one scale
        kernel = torch.ops.quantized.linear_dynamic
        if x.shape[0] == 1:
            return kernel(x, self.weight, _SEVEN_BITS).to(rows.dtype)
        return torch.cat([kernel(row, self.weight, _SEVEN_BITS) for row in x.split(1)]).to(rows.dtype)

    def portable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes and scales back, as the store keeps them (bit for bit)."""
        if not INT8_ACTIVATIONS:
            return self.weight, self.scale
        quantised, _ = torch.ops.quantized.linear_unpack(self.weight)
        return quantised.int_repr(), quantised.q_per_channel_scales().to(self.scale.dtype)

    def plain(self) -> torch.Tensor:
        """The weight the kernel multiplies by (for checks and norms)."""
        codes, scale = self.portable()
        return (codes.float() * scale.float()[:, None]).to(scale.dtype)


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


def linear(x: torch.Tensor, weight: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a plain, a packed, an int8 or an int4 weight."""
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
