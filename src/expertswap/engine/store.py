"""Expert store: one expert's weights on demand, from disk or from an optional RAM tier.

Sizes are computed from the checkpoint headers and the in-memory parameter shapes, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .errors import ModelFormatError
from .families import Family, Layout
from .quantize import LOW_PRECISION, dequantize, quantize, quantized_nbytes


@dataclass(frozen=True)
class ParamSpec:
    """One fused expert parameter as transformers holds it: per-expert shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one MoE layer: how many, their parameters, and the disk entries of each part."""

    layer: int
    num_experts: int
    top_k: int
    params: tuple[ParamSpec, ...]
    keys: dict[str, tuple[str, ...]]  # param -> key templates with {expert}
    quantize: str | None = None  # int8 | nf4 | fp4: experts are quantised when read (engine/quantize.py)

    @property
    def expert_bytes(self) -> int:
        """One expert's bytes as the store hands it out (quantised, when it is)."""
        return sum(quantized_nbytes(p.shape, p.dtype, self.quantize) for p in self.params)

    def plain(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's tensors as the model computes with them: dequantised to its dtype when quantised."""
        if self.quantize is None:
            return tensors
        return dequantize(tensors, self.quantize, {p.name: p.shape for p in self.params}, self.params[0].dtype)


class ExpertStore:
    """Reads experts of every MoE layer; keeps a host copy of all of them when the RAM tier is on."""

    def __init__(self, checkpoint: Checkpoint, layers: dict[int, LayerExperts], pin_memory: bool = False) -> None:
        self.checkpoint = checkpoint
        self.layers = layers
        self.pin_memory = pin_memory
        self._ram: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._low: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    @property
    def total_expert_bytes(self) -> int:
        return sum(spec.num_experts * spec.expert_bytes for spec in self.layers.values())

    def fill_ram_tier(self) -> None:
        """Copy every expert into host RAM (pinned on CUDA) so later swaps never touch the disk."""
        for layer, spec in self.layers.items():
            for expert in range(spec.num_experts):
                self._ram[(layer, expert)] = self._read_disk(layer, expert, pin=self.pin_memory)

    def pinned(self, layer: int, expert: int) -> bool:
        """Whether this expert waits in pinned host memory (a copy from it can run beside the compute)."""
        cached = self._ram.get((layer, expert))
        return cached is not None and all(t.is_pinned() for t in cached.values())

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Host tensors of one expert, per in-memory parameter, in the model's dtype (or quantised).

        A quantised expert is kept in host RAM after its first read: it is quantised once, and a later miss
        costs a copy of its quantised bytes (all of them together are what the fit report counts).
        """
        cached = self._ram.get((layer, expert))
        if cached is not None:
            return cached
        quantised = self.layers[layer].quantize is not None
        tensors = self._read_disk(layer, expert, pin=quantised and self.pin_memory)
        if quantised:
            self._ram[(layer, expert)] = tensors
        return tensors

    def low_precision(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's plain tensors from an nf4 copy (quantised on first use, kept in host RAM at a quarter of
        bf16's bytes): what the ``lowbit`` policy computes a miss from while the swapper brings the expert in."""
        spec = self.layers[layer]
        copy = self._low.get((layer, expert))
        if copy is None:
            copy = self._low[(layer, expert)] = quantize(spec.plain(self.read(layer, expert)), LOW_PRECISION)
        return dequantize(copy, LOW_PRECISION, {p.name: p.shape for p in spec.params}, spec.params[0].dtype)

    def _read_disk(self, layer: int, expert: int, pin: bool) -> dict[str, torch.Tensor]:
        spec = self.layers[layer]
        out: dict[str, torch.Tensor] = {}
        for param in spec.params:
            entries = [self.checkpoint.entry(t.format(expert=expert)) for t in spec.keys[param.name]]
            fused = ["{expert}" not in t for t in spec.keys[param.name]]
            if len(entries) > 1 and all(e.dtype == param.dtype for e in entries):
                # gate and up read straight into their halves of one tensor: no concatenation copy
                tensor = torch.empty(param.shape, dtype=param.dtype)
                row = 0
                for entry, whole in zip(entries, fused, strict=True):
                    rows = entry.shape[1] if whole else entry.shape[0]
                    self.checkpoint.read(entry, index=expert if whole else None, out=tensor[row : row + rows])
                    row += rows
            else:
                parts = [
                    self.checkpoint.read(e, index=expert if whole else None)
                    for e, whole in zip(entries, fused, strict=True)
                ]
                tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                tensor = tensor.to(param.dtype).reshape(param.shape)
            out[param.name] = tensor
        if spec.quantize is not None:
            out = quantize(out, spec.quantize)
        return {name: t.pin_memory() for name, t in out.items()} if pin else out


def resolve_layer(
    checkpoint: Checkpoint, family: Family, layer: int, num_experts: int, top_k: int, params: tuple[ParamSpec, ...],
    quantize: str | None = None,
) -> LayerExperts:
    """Find which of the family's disk layouts this checkpoint uses and check every expert is present."""
    prefix = family.disk_prefix.format(layer=layer)
    tried = []
    for layout in family.layouts:
        keys = _layout_keys(layout, prefix)
        first = [k.format(expert=0) for ks in keys.values() for k in ks]
        tried.append(first[0])
        if all(k in checkpoint for k in first) and set(keys) == {p.name for p in params}:
            _check_shapes(checkpoint, keys, params, num_experts, layer)
            return LayerExperts(layer, num_experts, top_k, params, keys, quantize)
    raise ModelFormatError(
        f"expert weights of MoE layer {layer} not found in {checkpoint.folder} (looked for {', '.join(tried)})"
    )


def _layout_keys(layout: Layout, prefix: str) -> dict[str, tuple[str, ...]]:
    return {
        name: tuple(t.replace("{prefix}", prefix) for t in templates) for name, templates in layout.items()
    }


def _check_shapes(
    checkpoint: Checkpoint,
    keys: dict[str, tuple[str, ...]],
    params: tuple[ParamSpec, ...],
    num_experts: int,
    layer: int,
) -> None:
    for param in params:
        templates = keys[param.name]
        for expert in range(num_experts):
            rows = 0
            for template in templates:
                fused = "{expert}" not in template
                entry = checkpoint.entry(template.format(expert=expert))
                shape = entry.shape[1:] if fused else entry.shape
                if fused and entry.shape[0] != num_experts:
                    raise ModelFormatError(f"{template}: {entry.shape[0]} experts on disk, config says {num_experts}")
                if tuple(shape[1:]) != tuple(param.shape[1:]):
                    raise ModelFormatError(f"layer {layer} expert {expert}: {param.name} has shape {shape} on disk")
                rows += shape[0]
            if rows != param.shape[0]:
                raise ModelFormatError(f"layer {layer} expert {expert}: {param.name} has {rows} rows on disk")
            if not templates[0].count("{expert}"):
                break  # fused tensors: one check covers every expert
