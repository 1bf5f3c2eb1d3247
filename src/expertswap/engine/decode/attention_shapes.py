"""Attention on the CPU in few shapes, so that its compiled kernels do not pile up.

torch's CPU flash attention, for bf16 and fp16 on CPUs with AMX, compiles a kernel for every
(query rows, key length) it meets and keeps it for the life of the process: every new prompt length
grew the resident set by about 0.7 MiB, for good. Rounding both lengths up to ``SHAPE_STEP`` (extra
query rows whose output is dropped, extra keys that are zero and masked) bounds the kernels to a few
dozen, at the price of attending to at most ``SHAPE_STEP - 1`` masked positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SHAPE_STEP = 64
_NAME = "expertswap_stepped_sdpa"


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def shape_step(device: torch.device, dtype: torch.dtype) -> int:
    """The step attention lengths are rounded to on ``device`` in ``dtype`` (1: they are not)."""
    return SHAPE_STEP if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


def _stepped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention with query rows and keys rounded up to ``SHAPE_STEP``."""
    rows, width = query.shape[2], key.shape[2]
    queries, keys = round_up(rows, SHAPE_STEP) if rows > 1 else 1, round_up(width, SHAPE_STEP)
    if (queries, keys) == (rows, width):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None and rows == width:  # a first prompt, causal: padded rows and keys stay causal
        keys = queries
    else:
        if attention_mask is None:  # causal, the new rows last (transformers leaves the mask out only then)
            seen = torch.arange(width - rows, width, device=query.device)[:, None]
            attention_mask = (torch.arange(width, device=query.device)[None, :] <= seen)[None, None]
        attention_mask = attention_mask[..., :rows, :width]
        hidden = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
        attention_mask = F.pad(attention_mask, (0, keys - width), value=hidden)
        attention_mask = torch.cat([attention_mask, attention_mask[..., -1:, :].expand(
            *attention_mask.shape[:-2], queries - rows, keys)], dim=-2)  # extra rows see what the last one sees
    query = F.pad(query, (0, 0, 0, queries - rows))
    key, value = F.pad(key, (0, 0, 0, keys - width)), F.pad(value, (0, 0, 0, keys - width))
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out[:, :rows], None


def use_stepped_attention(model: PreTrainedModel) -> None:
    """Route a CPU model's sdpa attention through ``_stepped_sdpa`` where the shapes would pile up."""
    if model.config._attn_implementation == "sdpa" and shape_step(model.device, model.dtype) > 1:
        AttentionInterface.register(_NAME, _stepped_sdpa)
        AttentionMaskInterface.register(_NAME, sdpa_mask)
        model.set_attn_implementation(_NAME)
