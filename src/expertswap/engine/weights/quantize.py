"""Packed experts: quantised once when read (int8, nf4, fp4) or as a checkpoint ships them (fp8, mxfp4).

int8 keeps a scale per row (per output channel, in the model's dtype: what torch's weight-only int8 kernel
takes, so on the CPU an int8 expert is multiplied as it lies, never dequantised); bitsandbytes does the
arithmetic of nf4/fp4, with a scale per 64 values. int4 (groups of 32, ``int4-g64``, ``int4-g128``) keeps two
codes per byte (the even column in the low nibble) and, per group of a row, a scale and a zero in the model's
dtype (value = (code - 8) * scale + zero, torch's int4 kernel's convention), laid out [groups, rows, 2].
Native checkpoints are read as they lie: fine-grained FP8 (e4m3 codes, a float32 ``weight_scale_inv`` per
block; Qwen3-*-FP8, DeepSeek-V3) and GPT-OSS's MXFP4 (two e2m1 codes per byte, a power-of-two exponent + 127
per 32 values). A packed expert is a dict of tensors like a plain one, each matrix ``name`` held as
``name.q`` (its codes) and ``name.scale``; biases stay as they are. The RAM tier and the committee slots hold
them so, and the budget counts their real bytes; the committee dequantises an expert's matrices to the
model's dtype when it computes (int8 on the CPU excepted, see ``packed.Int8Matrix``). Quantised when read,
the result is the quantised model, exactly: ``exact`` gives the same output at every budget, but that output
is not the original model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from expertswap.protocol.errors import ModelFormatError, UnsupportedArchitectureError

NATIVE_FORMATS = ("fp8", "mxfp4")  # config.json's quantization_config.quant_method of checkpoints read packed
LOW_PRECISION = "nf4"  # the copy the lowbit policy computes misses from
BLOCK = 64  # values per 4-bit scale (nf4, fp4)
INT4_GROUPS = {"int4": 32, "int4-g64": 64, "int4-g128": 128}  # values per scale and zero


def native_packing(config: Any) -> tuple[str | None, tuple[int, int] | None]:
    """The packed format a checkpoint's config declares (fp8 with its block, or mxfp4), or (None, None) for
    a plain one. A format the engine cannot read is refused here rather than read as garbage."""
    declared = getattr(config, "quantization_config", None)
    if declared is None:
        return None, None
    settings = declared if isinstance(declared, dict) else declared.to_dict()
    method = str(settings.get("quant_method", "unknown"))
    if method not in NATIVE_FORMATS:
        raise UnsupportedArchitectureError(
            f"{method}-quantised checkpoints are not supported; use the unquantised model (ExpertSwap can quantise "
            f"its experts itself: --quantize) or an fp8 / mxfp4 one"
        )
    if method == "mxfp4":
        return method, None
    block = settings.get("weight_block_size")
    if settings.get("fmt", "e4m3") != "e4m3" or not (isinstance(block, list | tuple) and len(block) == 2
                                                      and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelFormatError(f"fp8 checkpoints need e4m3 weights with a weight_block_size [rows, cols]; "
                               f"this one declares fmt={settings.get('fmt')!r}, weight_block_size={block!r}")
    return method, (block[0], block[1])


def _is_matrix(name: str, tensor: torch.Tensor) -> bool:
    return not name.endswith("_bias") and tensor.dim() >= 2


def quantized_nbytes(shape: tuple[int, ...], dtype: torch.dtype, kind: str | None,
                     block: tuple[int, int] | None = None) -> int:
    """Bytes one expert parameter takes packed as ``kind`` (None: as stored); fp8 needs its ``block``."""
    numel = math.prod(shape)
    if kind is None or len(shape) < 2:
        return numel * dtype.itemsize
    if kind == "int8":
        return numel + math.prod(shape[:-1]) * dtype.itemsize  # codes, a scale per row in the model's dtype
    if kind == "fp8":
        assert block is not None, "fp8 sizes need the checkpoint's weight_block_size"
        return numel + math.ceil(shape[-2] / block[0]) * math.ceil(shape[-1] / block[1]) * 4
    if kind == "mxfp4":
        return numel // 2 + numel // 32  # two codes per byte, an exponent byte per 32 values
    if kind in INT4_GROUPS:
        return numel // 2 + numel // INT4_GROUPS[kind] * 2 * dtype.itemsize  # codes, a scale and a zero per group
    return math.ceil(numel / 2) + math.ceil(numel / BLOCK) * 4  # two codes per byte, a float32 scale per block


def quantize(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """One expert's host tensors, quantised (see the module's docstring for the layout)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not _is_matrix(name, tensor):
            out[name] = tensor
        elif kind == "int8":
            out[f"{name}.q"], out[f"{name}.scale"] = int8_rows(tensor)
        elif kind in INT4_GROUPS:
            out[f"{name}.q"], out[f"{name}.scale"] = _int4_groups(tensor, INT4_GROUPS[kind])
        else:
            import bitsandbytes.functional as bnb  # only a 4-bit load pays for importing it

            codes, state = bnb.quantize_4bit(tensor.contiguous(), blocksize=BLOCK, quant_type=kind)
            out[f"{name}.q"], out[f"{name}.scale"] = codes, state.absmax
    return out


def int8_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row (the last dimension is the input) and each row's scale, in the tensor's dtype:
    the scale is rounded first and the codes computed against the rounded one."""
    rows = tensor.float().reshape(-1, tensor.shape[-1])
    scale = (rows.abs().amax(dim=1) / 127).clamp(min=torch.finfo(tensor.dtype).tiny).to(tensor.dtype)
    codes = torch.round(rows / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(tensor.shape), scale


def int4_shape_error(shape: tuple[int, ...], kind: str) -> str | None:
    """Why a matrix of ``shape`` cannot be ``kind`` (int4 groups tile each row; the CPU kernel takes rows by 16),
    or None."""
    group, cols = INT4_GROUPS[kind], shape[-1]
    rows = math.prod(shape[:-1])
    if cols % group or rows % 16:
        return (f"{kind} needs a multiple of 16 rows, each a multiple of {group} values wide; this expert matrix is "
                f"{rows}x{cols}")
    return None


def _int4_groups(tensor: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per ``group`` values of a row (min to max in 15 steps), two per byte, and each group's
    (scale, zero) in the tensor's dtype, rounded first and the codes computed against the rounded ones."""
    rows = tensor.float().reshape(-1, tensor.shape[-1])
    n, k = rows.shape
    groups = rows.reshape(n, k // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(tensor.dtype).tiny).to(tensor.dtype).float()
    zero = (low + 8 * scale).to(tensor.dtype).float()
    codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(tensor.dtype)


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols] int32 codes 0..15 from two per byte (the even column low)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def packed_parts(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, codes, scale) for each matrix of a packed expert, (name, tensor, None) for what is kept plain."""
    for name, tensor in tensors.items():
        if name.endswith(".q"):
            base = name[: -len(".q")]
            yield base, tensor, tensors[f"{base}.scale"]
        elif not name.endswith(".scale"):
            yield name, tensor, None


def dequantize(tensors: dict[str, torch.Tensor], kind: str, shapes: dict[str, tuple[int, ...]],
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain tensors back, in ``dtype``; ``shapes`` gives each matrix's per-expert shape."""
    out: dict[str, torch.Tensor] = {}
    for base, tensor, scale in packed_parts(tensors):
        if scale is None:
            out[base] = tensor
            continue
        shape = shapes[base]
        if kind == "fp8":
            plain = _fp8_plain(base, tensor, scale)
        elif kind in INT4_GROUPS:
            plain = _int4_plain(base, tensor, scale, INT4_GROUPS[kind], shape)
        elif kind == "mxfp4":
            plain = _mxfp4_plain(base, tensor, scale, shape)
        else:
            plain = _quantised_plain(base, tensor, scale, kind, shape, dtype)
        out[base] = plain.to(dtype)
    return out


def _quantised_plain(name: str, codes: torch.Tensor, scale: torch.Tensor, kind: str, shape: tuple[int, ...],
                     dtype: torch.dtype) -> torch.Tensor:
    """int8, nf4 or fp4 codes back to values; the count of scales checked first (a wrong one is a bad file)."""
    want = math.prod(shape[:-1]) if kind == "int8" else math.ceil(math.prod(shape) / BLOCK)
    if scale.numel() != want:
        raise ValueError(f"{name}: {scale.numel()} {kind} scales for a {tuple(shape)} matrix, expected {want}")
    if kind == "int8":
        return (codes.float().reshape(want, -1) * scale.float()[:, None]).reshape(codes.shape)
    import bitsandbytes.functional as bnb

    state = bnb.QuantState(scale, shape=torch.Size(shape), blocksize=BLOCK, quant_type=kind, dtype=dtype)
    return bnb.dequantize_4bit(codes, state)


def _int4_plain(name: str, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int,
                shape: tuple[int, ...]) -> torch.Tensor:
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if tuple(packed.shape) != (rows, cols // 2) or tuple(scale_zeros.shape) != (cols // group, rows, 2):
        raise ValueError(f"{name}: int4 codes {tuple(packed.shape)} and scales {tuple(scale_zeros.shape)} do not "
                         f"make a {tuple(shape)} matrix")
    codes = int4_codes(packed).float().reshape(rows, cols // group, group)
    scale, zero = (scale_zeros.float().transpose(0, 1)[..., i, None] for i in (0, 1))
    return ((codes - 8) * scale + zero).reshape(shape)


def _fp8_plain(name: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes times their block's scale; the block is the codes' shape over the scale grid's, as
    transformers derives it (gate and up, read as one matrix, each fill whole blocks)."""
    rows, cols = codes.shape
    grid_rows, grid_cols = scale.shape
    if rows % grid_rows or cols % grid_cols:
        raise ValueError(f"{name}: a {grid_rows}x{grid_cols} scale grid does not tile a {rows}x{cols} fp8 matrix")
    expanded = scale.repeat_interleave(rows // grid_rows, 0).repeat_interleave(cols // grid_cols, 1)
    return codes.to(scale.dtype) * expanded


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _mxfp4_plain(name: str, codes: torch.Tensor, exponents: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[rows, groups, 16] bytes (low nibble first) and [rows, groups] biased exponents -> the model's
    [groups * 32, rows] matrix (GPT-OSS computes ``x @ W``; the checkpoint stores one row per output)."""
    if codes.shape[:-1] != exponents.shape or codes.shape[-1] != 16:
        raise ValueError(f"{name}: mxfp4 blocks {tuple(codes.shape)} do not match scales {tuple(exponents.shape)}")
    rows, groups = exponents.shape
    if (groups * 32, rows) != tuple(shape):
        raise ValueError(f"{name}: mxfp4 blocks unpack to {groups * 32}x{rows}, the model wants {tuple(shape)}")
    lut = torch.tensor(_E2M1, device=codes.device)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1).reshape(rows, groups, 32)
    plain = torch.ldexp(values, exponents.to(torch.int32)[..., None] - 127)
    return plain.reshape(rows, groups * 32).t()
