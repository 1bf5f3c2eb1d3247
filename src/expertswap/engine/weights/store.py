"""Expert store: one expert's weights on demand, from disk or from an optional RAM tier.

Sizes are computed from the checkpoint headers and the in-memory parameter shapes, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertswap.engine.weights.checkpoint import Checkpoint
from expertswap.engine.weights.families import Family, Layout
from expertswap.engine.weights.packed_file import PackedLayer
from expertswap.engine.weights.quantize import LOW_PRECISION, NATIVE_FORMATS, dequantize, quantize, quantized_nbytes
from expertswap.protocol.errors import ModelFormatError
from expertswap.protocol.plan import LayerShape


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
    keys: dict[str, tuple[str, ...]]  # param -> key templates with {expert} (a packed matrix's codes)
    # how the store keeps each expert (engine/weights/quantize.py): int8 | int4* | nf4 | fp4 quantised when read,
    # fp8 | mxfp4 as the checkpoint ships them; None: plain
    packing: str | None = None
    block: tuple[int, int] | None = None  # fp8's weight_block_size
    slots_plain: bool = False  # the slots hold experts unpacked (families off the row path): read() unpacks

    @property
    def native(self) -> bool:
        """Whether the checkpoint itself holds the experts packed (they are read as they lie)."""
        return self.packing in NATIVE_FORMATS

    @property
    def quantize(self) -> str | None:
        """The packed form the committee slots hold, dequantised for each forward (None: plain)."""
        return None if self.slots_plain else self.packing

    @property
    def expert_bytes(self) -> int:
        """One expert's bytes as a committee slot holds it (packed, when it is)."""
        return sum(quantized_nbytes(p.shape, p.dtype, self.quantize, self.block) for p in self.params)

    @property
    def shape(self) -> LayerShape:
        """What the planner knows of this layer."""
        return LayerShape(self.num_experts, self.top_k, self.expert_bytes)

    def plain(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A slot's tensors as the model computes with them: dequantised to its dtype when packed."""
        return tensors if self.quantize is None else self.unpack(tensors)

    def unpack(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert as the store keeps it, unpacked to the model's dtype."""
        if self.packing is None:
            return tensors
        return dequantize(tensors, self.packing, {p.name: p.shape for p in self.params}, self.params[0].dtype)


class ExpertStore:
    """Reads experts of every MoE layer; keeps a host copy of all of them when the RAM tier is on."""

    def __init__(self, checkpoint: Checkpoint, layers: dict[int, LayerExperts], pin_memory: bool = False) -> None:
        self.checkpoint = checkpoint
        self.layers = layers
        self.pin_memory = pin_memory
        self._ram: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._low: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._packed: dict[int, PackedLayer] = {}  # layers whose packed file is written (packed_file.py)
        self._ram_tier = False

    @property
    def total_expert_bytes(self) -> int:
        return sum(spec.num_experts * spec.expert_bytes for spec in self.layers.values())

    def fill_ram_tier(self) -> None:
        """Copy every expert into host RAM (pinned on CUDA) so later swaps never touch the disk."""
        self._ram_tier = True
        for layer, spec in self.layers.items():
            written = self._packed.get(layer)
            for expert in range(spec.num_experts):
                if written is None:
                    self._ram[(layer, expert)] = self._read_disk(layer, expert, pin=self.pin_memory)
                else:
                    self._ram[(layer, expert)] = _pinned(written.read(expert), self.pin_memory)

    def release(self) -> None:
        """Drop the host copies and close the packed files (the engine is closing)."""
        self._ram.clear()
        self._low.clear()
        for packed in self._packed.values():
            packed.close()
        self._packed.clear()

    def attach_packed(self, layer: int, packed: PackedLayer) -> None:
        """Misses of ``layer`` now read its packed file: the RAM copies made as experts were first read go (the
        page cache holds what is read often, and gives it back under pressure), unless the RAM tier keeps them."""
        self._packed[layer] = packed
        if not self._ram_tier:
            for key in [key for key in self._ram if key[0] == layer]:
                self._ram.pop(key, None)

    def packed_layers(self) -> set[int]:
        return set(self._packed)

    def for_packing(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert as the store keeps it, for the packed file: the RAM copy if there is one, else quantised from
        the checkpoint (the same bits: quantising is deterministic)."""
        return self._ram.get((layer, expert)) or self._read_disk(layer, expert, pin=False)

    @property
    def host_bytes(self) -> int:
        """Bytes of the experts kept in host RAM (the RAM tier, packed experts after their first read)."""
        return sum(t.nbytes for tensors in self._ram.values() for t in tensors.values())

    def kept(self, layer: int, expert: int) -> dict[str, torch.Tensor] | None:
        """The expert as host RAM keeps it (packed, when it is), or None when it is read from disk each time."""
        return self._ram.get((layer, expert))

    def pinned(self, layer: int, expert: int) -> bool:
        """Whether this expert waits in pinned host memory (a copy from it can run beside the compute)."""
        cached = self._ram.get((layer, expert))
        return cached is not None and all(t.is_pinned() for t in cached.values())

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Host tensors of one expert, per in-memory parameter, as its committee's slots hold them.

        A packed expert is kept in host RAM after its first read: it is quantised (or read) once, and a later
        miss costs a copy of its packed bytes (all of them together are what the fit report counts). Once its
        layer's packed file is written (packed_file.py), it is read from there instead and not kept. Where the
        slots hold experts plain, each read unpacks the kept copy.
        """
        spec = self.layers[layer]
        cached = self._ram.get((layer, expert))
        if cached is None:
            packed = spec.packing is not None
            pin = packed and self.pin_memory and not spec.slots_plain
            written = self._packed.get(layer)
            if written is not None:  # read from the packed file each time, not kept
                cached = _pinned(written.read(expert), pin)
            else:
                cached = self._read_disk(layer, expert, pin=pin)
                if packed:
                    self._ram[(layer, expert)] = cached
        return spec.unpack(cached) if spec.slots_plain else cached

    def lend(self, layer: int, expert: int) -> None:
        """A slot now holds this expert in a form it can give back (int8's kernel copy): the RAM copy goes, so the
        expert is held once."""
        self._ram.pop((layer, expert), None)

    def take_back(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """A lent expert that left its slot, as ``read`` returns it: kept in RAM again for its next miss (unless its
        layer's packed file is written: the miss reads it there)."""
        if layer not in self._packed or self._ram_tier:
            self._ram[(layer, expert)] = tensors

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
            if spec.native and len(param.shape) >= 2:
                codes = spec.keys[param.name]
                out[f"{param.name}.q"] = self._read_parts(codes, expert)
                out[f"{param.name}.scale"] = self._read_parts([scale_key(t, spec.packing) for t in codes], expert)
                continue
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
        if spec.packing is not None and not spec.native:
            out = quantize(out, spec.packing)
        return _pinned(out, pin)

    def _read_parts(self, templates: Sequence[str], expert: int) -> torch.Tensor:
        """One expert's slices of these tensors as stored, joined along their first dimension."""
        parts = [self.checkpoint.read(self.checkpoint.entry(t.format(expert=expert)),
                                      index=None if "{expert}" in t else expert) for t in templates]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _pinned(tensors: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
    """The tensors in pinned host memory when ``pin`` (a copy from there to a GPU runs beside the compute)."""
    return {name: t.pin_memory() for name, t in tensors.items()} if pin else tensors


def scale_key(codes: str, packing: str | None) -> str:
    """The key of the scales beside a packed matrix's codes (fp8: ``weight_scale_inv``; mxfp4: ``_scales``)."""
    return codes + "_scale_inv" if packing == "fp8" else codes.removesuffix("_blocks") + "_scales"


def resolve_layer(
    checkpoint: Checkpoint, family: Family, layer: int, num_experts: int, top_k: int, params: tuple[ParamSpec, ...],
    packing: str | None = None, block: tuple[int, int] | None = None, slots_plain: bool = False,
) -> LayerExperts:
    """Find which of the family's disk layouts this checkpoint uses and check every expert is present."""
    prefix = family.disk_prefix.format(layer=layer)
    native = packing in NATIVE_FORMATS
    matrices = {p.name for p in params if len(p.shape) >= 2}
    tried = []
    for layout in family.layouts:
        keys = _layout_keys(layout, prefix)
        if packing == "mxfp4":  # GPT-OSS names its packed matrices' codes <name>_blocks
            keys = {name: tuple(t + "_blocks" if name in matrices else t for t in ts) for name, ts in keys.items()}
        first = [k.format(expert=0) for ks in keys.values() for k in ks]
        tried.append(first[0])
        if all(k in checkpoint for k in first) and set(keys) == {p.name for p in params}:
            spec = LayerExperts(layer, num_experts, top_k, params, keys, packing, block, slots_plain)
            plain = [p for p in params if not native or p.name not in matrices]
            _check_shapes(checkpoint, keys, tuple(plain), num_experts, layer)
            if native:
                _check_packed(checkpoint, spec, [p for p in params if p.name in matrices])
            return spec
    raise ModelFormatError(
        f"expert weights of MoE layer {layer} not found in {checkpoint.folder} (looked for {', '.join(tried)})"
    )


def _check_packed(checkpoint: Checkpoint, spec: LayerExperts, matrices: list[ParamSpec]) -> None:
    """Each packed matrix's codes and scales have the dtypes and shapes its format needs, for every expert:
    a mismatch would otherwise surface as garbage text or a crash mid-reply."""
    for param in matrices:
        for expert in range(spec.num_experts):
            rows = 0
            for template in spec.keys[param.name]:
                fused = "{expert}" not in template
                codes = checkpoint.entry(template.format(expert=expert))
                scales = checkpoint.entry(scale_key(template, spec.packing).format(expert=expert))
                cshape, sshape = (c.shape[1:] if fused else c.shape for c in (codes, scales))
                if fused and (codes.shape[0], scales.shape[0]) != (spec.num_experts, spec.num_experts):
                    raise ModelFormatError(f"{template}: {codes.shape[0]} experts on disk, config says "
                                           f"{spec.num_experts}")
                want = _packed_shapes(spec, param, cshape)
                if (codes.dtype, tuple(cshape), scales.dtype, tuple(sshape)) != want:
                    raise ModelFormatError(
                        f"layer {spec.layer} expert {expert}: {spec.packing} weights {param.name} "
                        f"{tuple(cshape)} {codes.dtype} with scales {tuple(sshape)} {scales.dtype} do not match; "
                        f"expected {want[1]} {want[0]} with scales {want[3]} {want[2]}"
                    )
                rows += cshape[0]
            wanted_rows = param.shape[1] if spec.packing == "mxfp4" else param.shape[0]
            if rows != wanted_rows:
                raise ModelFormatError(f"layer {spec.layer} expert {expert}: {param.name} has {rows} rows on disk")
            if "{expert}" not in spec.keys[param.name][0]:
                break  # fused tensors: one check covers every expert


PackedShapes = tuple[torch.dtype, tuple[int, ...], torch.dtype, tuple[int, ...]]  # codes, then scales


def _packed_shapes(spec: LayerExperts, param: ParamSpec, codes: tuple[int, ...]) -> PackedShapes:
    """What one part's codes and scales must be, given the rows it has on disk."""
    if spec.packing == "mxfp4":  # the model computes x @ W: a stored row is one of W's columns
        rows, cols = codes[0], param.shape[0]
        return torch.uint8, (rows, cols // 32, 16), torch.uint8, (rows, cols // 32)
    assert spec.block is not None
    rows, cols = codes[0], param.shape[1]
    grid = (math.ceil(rows / spec.block[0]), math.ceil(cols / spec.block[1]))
    return torch.float8_e4m3fn, (rows, cols), torch.float32, grid


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
