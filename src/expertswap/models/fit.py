"""Will a model fit? Sizes read from config.json and the safetensors headers alone, before loading."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from expertswap.engine.weights import Checkpoint, Family, native_packing, quantized_nbytes, read_config
from expertswap.protocol.budget import parse_budget
from expertswap.protocol.errors import ModelFormatError, SettingsError
from expertswap.protocol.units import format_bytes

_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class FitReport:
    """What a load at ``budget_bytes`` needs next to what the machine has free."""

    family: str
    non_expert_bytes: int
    total_expert_bytes: int
    minimum_budget_bytes: int
    budget_bytes: int
    kv_cache_bytes: int
    context_tokens: int
    free_ram_bytes: int
    free_vram_bytes: int | None
    device: str

    @property
    def needed_bytes(self) -> int:
        return self.non_expert_bytes + self.budget_bytes + self.kv_cache_bytes

    @property
    def fits(self) -> bool:
        free = self.free_vram_bytes if self.free_vram_bytes is not None else self.free_ram_bytes
        return self.budget_bytes >= self.minimum_budget_bytes and self.needed_bytes <= free

    def warning(self) -> str:
        """A plain sentence when it will not fit, else an empty string."""
        where = "GPU memory" if self.free_vram_bytes is not None else "free RAM"
        free = self.free_vram_bytes if self.free_vram_bytes is not None else self.free_ram_bytes
        if self.budget_bytes < self.minimum_budget_bytes:
            return (f"The budget {format_bytes(self.budget_bytes)} is below this model's minimum of "
                    f"{format_bytes(self.minimum_budget_bytes)} (its top-k experts in every MoE layer).")
        if self.needed_bytes > free:
            return (f"This will not fit: it needs {format_bytes(self.needed_bytes)} (weights outside the experts "
                    f"{format_bytes(self.non_expert_bytes)}, experts {format_bytes(self.budget_bytes)}, KV cache "
                    f"{format_bytes(self.kv_cache_bytes)}) but only {format_bytes(free)} of {where} is available. "
                    "Lower the budget or the context length.")
        return ""


def _expert_pattern(family: Family) -> re.Pattern[str]:
    """Any of the family's expert keys; the first group that matched is the layer number."""
    prefix = re.escape(family.disk_prefix).replace(r"\{layer\}", r"(\d+)")
    templates = {t for layout in family.layouts for ts in layout.values() for t in ts}
    bodies = sorted(re.escape(t).replace(r"\{prefix\}", prefix).replace(r"\{expert\}", r"\d+") for t in templates)
    packed = "(?:_scale_inv|_blocks|_scales)?"  # a natively packed matrix's codes and scales
    return re.compile("|".join(f"(?:{b}{packed})" for b in bodies))


def _layer_of(match: re.Match[str]) -> int:
    return int(next(g for g in match.groups() if g is not None))


def _non_expert_bytes(key: str, shape: tuple[int, ...], dtype: torch.dtype, native: str | None,
                      plain: torch.dtype) -> int:
    """A tensor outside the experts once loaded: an fp8 checkpoint's weights unpacked to the model's dtype by
    transformers (their scales gone), the rest as stored."""
    if native == "fp8" and dtype == torch.float8_e4m3fn:
        return math.prod(shape) * plain.itemsize
    if native == "fp8" and key.endswith("_scale_inv"):
        return 0
    return math.prod(shape) * dtype.itemsize


def _expert_entry_bytes(key: str, shape: tuple[int, ...], dtype: torch.dtype, experts: int,
                        quantize: str | None, native: str | None, plain: torch.dtype) -> int:
    """An expert tensor's bytes once loaded: quantised matrices as the engine holds them, fp8 ones (and their
    scales) as stored, GPT-OSS's MXFP4 blocks unpacked to the model's dtype as its slots hold them (the RAM
    tier keeps them packed), the rest as stored."""
    if native == "mxfp4" and key.endswith("_blocks"):
        return math.prod(shape) * 2 * plain.itemsize
    if native == "mxfp4" and key.endswith("_scales"):
        return 0
    if quantize is None or "bias" in key or len(shape) < 2:
        return math.prod(shape) * dtype.itemsize
    if len(shape) == 3 and shape[0] == experts:  # every expert's matrix in one tensor
        return experts * quantized_nbytes(shape[1:], dtype, quantize)
    return quantized_nbytes(shape, dtype, quantize)


def fit_report(model_dir: str | Path, budget: str | int = "100%", context_tokens: int = 4096,
               device: str = "cpu", quantize: str | None = None) -> FitReport:
    """Sizes of a model folder and the machine's free memory; reads no weights.

    ``quantize`` (int8, int4, nf4, ...) counts the experts as the engine holds them once quantised. A natively packed
    checkpoint (fp8, mxfp4) is counted as the engine holds it.
    """
    folder, config, family = read_config(model_dir)
    native, _ = native_packing(config)
    if native is not None and quantize is not None:
        raise SettingsError(f"this checkpoint's experts are already {native}; quantize applies to unquantised ones")
    plain = getattr(config, "dtype", None)
    plain = plain if isinstance(plain, torch.dtype) else torch.bfloat16
    checkpoint = Checkpoint(folder)
    experts = next((int(getattr(config, f)) for f in _EXPERT_COUNT_FIELDS if getattr(config, f, None)), 0)
    try:
        pattern = _expert_pattern(family)
        per_layer: dict[int, int] = {}
        total = 0
        for key, entry in checkpoint.entries.items():
            shape = tuple(entry.shape)
            if match := pattern.fullmatch(key):
                layer = _layer_of(match)
                size = _expert_entry_bytes(key, shape, entry.dtype, experts, quantize, native, plain)
                per_layer[layer] = per_layer.get(layer, 0) + size
            else:
                total += _non_expert_bytes(key, shape, entry.dtype, native, plain)
    finally:
        checkpoint.close()
    if not per_layer or experts <= 0:
        raise ModelFormatError(f"no expert weights found in {folder}")
    top_k = int(config.num_experts_per_tok)
    expert_total = sum(per_layer.values())
    text = getattr(config, "get_text_config", lambda: config)()
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    dtype_bytes = next(iter(checkpoint.entries.values())).dtype.itemsize
    kv = 2 * int(text.num_hidden_layers) * heads * head_dim * context_tokens * dtype_bytes
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return FitReport(
        family=family.name,
        non_expert_bytes=total,
        total_expert_bytes=expert_total,
        minimum_budget_bytes=sum(top_k * size // experts for size in per_layer.values()),
        budget_bytes=parse_budget(budget, expert_total),
        kv_cache_bytes=kv,
        context_tokens=context_tokens,
        free_ram_bytes=int(psutil.virtual_memory().available),
        free_vram_bytes=int(torch.cuda.mem_get_info()[0]) if cuda else None,
        device=device,
    )
