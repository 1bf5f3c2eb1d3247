"""Natively quantised checkpoints in the hub's on-disk layout, written from a plain one (test fixtures).

What users download: fine-grained FP8 (Qwen3-*-FP8, DeepSeek-V3: e4m3 weights, a float32
``weight_scale_inv`` per block) and GPT-OSS's MXFP4 (``*_blocks``: two e2m1 codes per byte, 32 values
per block; ``*_scales``: the block's power-of-two exponent + 127). transformers' own loader dequantises
both on the CPU, which makes it the reference the engine is checked against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix as e4m3 codes and the float32 scale of each ``block`` (the last blocks may be partial)."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    codes = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(padded.shape)[:rows, :cols]
    return codes.contiguous(), scale


def to_fp8(folder: Path, block: tuple[int, int] = (16, 16)) -> Path:
    """Rewrite ``folder`` as a fine-grained FP8 checkpoint: every linear weight but the routers and lm_head."""
    keep = ("embed_tokens", "lm_head", "norm", ".gate.weight", "router", "shared_expert_gate")
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if key.endswith(".weight") and tensor.dim() == 2 and not any(k in key for k in keep):
                out[key], out[key.removesuffix("weight") + "weight_scale_inv"] = fp8_blocks(tensor, block)
            else:
                out[key] = tensor
        save_file(out, file, metadata={"format": "pt"})
    _set_quantization(folder, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                               "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]})
    return folder


def mxfp4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] as GPT-OSS stores it: codes [..., rows, cols/32, 16] and exponents [..., rows, cols/32]."""
    *lead, rows, cols = weight.shape
    groups = weight.float().reshape(*lead, rows, cols // 32, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    codes = (scaled[..., None] - E2M1).abs().argmin(dim=-1).to(torch.uint8)  # nearest e2m1 value
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent.squeeze(-1) + 127).to(torch.uint8)


def to_mxfp4(folder: Path) -> Path:
    """Rewrite a GPT-OSS ``folder`` with its experts as MXFP4 blocks and scales, as OpenAI ships it."""
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                # in memory [E, in, out]; on disk the blocks run along ``in`` for each output row
                out[f"{key}_blocks"], out[f"{key}_scales"] = mxfp4_blocks(tensor.transpose(1, 2))
            else:
                out[key] = tensor
        save_file(out, file, metadata={"format": "pt"})
    _set_quantization(folder, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return folder


def _set_quantization(folder: Path, config: dict[str, object]) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"] = config
    path.write_text(json.dumps(raw, indent=2))
