"""The file the repository ships for the default model: routers, neuron order and 4-bit weight deltas.

Everything else comes from the GGUF. Deltas (trained minus converted weights) are quantised to 4 bits
in groups of 64 with one float16 scale per group; shards stay under 16 MB each.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from expertswap.protocol.errors import ModelFormatError

from .moe_layout import LayerPlan, MoeDesign

GROUP = 64
PLAN_FILE = "plan.safetensors"
DELTA_GLOB = "deltas-*.safetensors"
SHARD_BYTES = 15 * 2**20


def quantize4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes (two per byte) and float16 scales, in groups of ``GROUP`` values."""
    flat = x.detach().float().reshape(-1, GROUP)
    scale = (flat.abs().amax(dim=1, keepdim=True) / 7.0).clamp(min=1e-12).half()
    codes = (flat / scale.float()).round().clamp(-8, 7).to(torch.int16) + 8
    codes = codes.reshape(-1, 2)
    packed = (codes[:, 0] | (codes[:, 1] << 4)).to(torch.uint8)
    return packed, scale.reshape(-1)


def dequantize4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``quantize4`` (up to the rounding it made)."""
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    codes = torch.stack([low, high], dim=1).reshape(-1, GROUP).float()
    return (codes * scale.float()[:, None]).reshape(shape)


def save(folder: Path, design: MoeDesign, plans: dict[int, LayerPlan], recipe: dict) -> list[Path]:
    """Write the plan file and delta shards; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    plan_tensors: dict[str, torch.Tensor] = {}
    for layer, plan in plans.items():
        plan_tensors[f"{layer}.order"] = plan.order.to(torch.int16).contiguous()
        plan_tensors[f"{layer}.router"] = plan.router.float().contiguous()
        plan_tensors[f"{layer}.shared_gate"] = plan.shared_gate.float().contiguous()
        if plan.norm is not None:
            plan_tensors[f"{layer}.norm"] = plan.norm.float().contiguous()
    meta = {"design": json.dumps(asdict(design)), "recipe": json.dumps(recipe)}
    written = [folder / PLAN_FILE]
    save_file(plan_tensors, written[0], metadata=meta)
    shard: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, shapes, size
        path = folder / f"deltas-{len(written):05d}.safetensors"
        save_file(shard, path, metadata={"shapes": json.dumps(shapes)})
        written.append(path)
        shard, shapes, size = {}, {}, 0

    for layer, plan in plans.items():
        for suffix, delta in plan.deltas.items():
            packed, scale = quantize4(delta)
            shard[f"{layer}.{suffix}.q"], shard[f"{layer}.{suffix}.s"] = packed, scale
            shapes[f"{layer}.{suffix}"] = list(delta.shape)
            size += packed.numel() + 2 * scale.numel()
            if size >= SHARD_BYTES:
                flush()
    if shard:
        flush()
    return written


def load(folder: Path) -> tuple[MoeDesign, dict[int, LayerPlan], dict]:
    """Read what ``save`` wrote: the design, one plan per MoE layer (deltas dequantised) and the recipe."""
    plan_path = folder / PLAN_FILE
    if not plan_path.is_file():
        raise ModelFormatError(f"the default model's shipped file {plan_path} is missing")
    try:
        with safe_open(plan_path, "pt") as handle:
            meta = handle.metadata()
            design_fields = json.loads(meta["design"])
            design_fields["dense_layers"] = tuple(design_fields["dense_layers"])
            design, recipe = MoeDesign(**design_fields), json.loads(meta["recipe"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        plans: dict[int, LayerPlan] = {}
        for key in tensors:
            layer, name = key.split(".", 1)
            if name == "order":
                i = int(layer)
                plans[i] = LayerPlan(
                    order=tensors[key].long(), router=tensors[f"{i}.router"],
                    shared_gate=tensors[f"{i}.shared_gate"], norm=tensors.get(f"{i}.norm"),
                )
        for path in sorted(folder.glob(DELTA_GLOB)):
            with safe_open(path, "pt") as handle:
                shapes = json.loads(handle.metadata()["shapes"])
                for name, shape in shapes.items():
                    layer, suffix = name.split(".", 1)
                    packed, scale = handle.get_tensor(f"{name}.q"), handle.get_tensor(f"{name}.s")
                    plans[int(layer)].deltas[suffix] = dequantize4(packed, scale, tuple(shape))
    except (KeyError, ValueError, OSError, SafetensorError) as exc:
        raise ModelFormatError(f"the default model's shipped files in {folder} are damaged: {exc}") from exc
    return design, plans, recipe
