"""Packed experts written to disk once, so that a miss reads packed bytes and nothing is quantised twice.

A quantised expert (``--quantize``) is made from the checkpoint's bf16 bytes when it is first read. Without this
file a miss after a restart, or after the RAM copy went, reads 2-4x the bytes it needs and quantises again. The
engine writes every layer's packed experts once, in the background, and reads misses from there.

Where: a folder per checkpoint and format under the front end's cache (``<cache>/packed/<fingerprint>-<format>``);
the fingerprint is the checkpoint files' names, sizes and modification times, so a changed checkpoint gets a new
folder. What: one safetensors file per MoE layer, ``layer-0003.safetensors``, holding each expert as the store
keeps it (key ``<expert>.<name>``). It is written to ``.part``, flushed and renamed, so a file under its own name
is whole: a crash or a full disk leaves at most a ``.part``, redone by the next load, and the layers before it
count (the work resumes). The files are read like any checkpoint (``Checkpoint``: checked headers, positioned
reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from expertswap.engine.weights.checkpoint import DTYPE_NAMES, Checkpoint

FORMAT_VERSION = 1  # bumped when the layout of a packed expert changes: older folders are then not read


def packed_folder(root: Path, checkpoint: Checkpoint, kind: str) -> Path:
    """The folder this checkpoint's experts in ``kind`` are packed to, under ``root``."""
    digest = hashlib.sha256()
    for name, size, mtime in checkpoint.stamps():
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return root / f"{digest.hexdigest()[:20]}-{kind}-v{FORMAT_VERSION}"


def layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer-{layer:04d}.safetensors"


class PackedLayer:
    """One layer's packed file, indexed: each expert read as the store keeps it."""

    def __init__(self, file: Checkpoint) -> None:
        self.file = file
        self.names = [key.partition(".")[2] for key in file.entries if key.startswith("0.")]

    def read(self, expert: int) -> dict[str, torch.Tensor]:
        return {name: self.file.read(self.file.entry(f"{expert}.{name}")) for name in self.names}

    def close(self) -> None:
        self.file.close()


def read_layer(folder: Path, layer: int, experts: int) -> PackedLayer | None:
    """The layer's packed file, or None while it is not written; one that is not whole (corrupt, or not this
    model's) is removed, to be written again."""
    path = layer_file(folder, layer)
    if not path.exists():
        return None
    try:
        packed = PackedLayer(Checkpoint(folder, files=[path]))
        if not packed.names or len(packed.file.entries) != experts * len(packed.names):
            raise ValueError(f"{path.name} does not hold {experts} experts")
        return packed
    except Exception:  # ModelFormatError or the check above: redone rather than read
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def write_layer(folder: Path, layer: int, count: int, read: Callable[[int], dict[str, torch.Tensor]],
                stop: Callable[[], bool]) -> bool:
    """Write experts 0..count-1 of ``layer`` (``read(e)`` gives each as the store keeps it) one at a time, so only
    one is in memory; False if ``stop()`` asked to stop first. An OSError (a full or read-only disk) leaves no
    ``.part`` behind."""
    folder.mkdir(parents=True, exist_ok=True)
    path = layer_file(folder, layer)
    part = path.with_name(path.name + ".part")
    first = read(0)
    names = list(first)
    header: dict[str, object] = {}
    offset = 0
    for expert in range(count):
        for name in names:
            tensor = first[name]
            header[f"{expert}.{name}"] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                          "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    try:
        with open(part, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for expert in range(count):
                if stop():
                    raise InterruptedError
                tensors = first if expert == 0 else read(expert)
                for name in names:
                    tensor, want = tensors[name].contiguous(), first[name]
                    if tensor.shape != want.shape or tensor.dtype != want.dtype:
                        raise ValueError(f"layer {layer} expert {expert}: {name} is {tuple(tensor.shape)} "
                                         f"{tensor.dtype}, expert 0's is {tuple(want.shape)} {want.dtype}")
                    out.write(tensor.view(-1).view(torch.uint8).numpy().data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
    except InterruptedError:
        part.unlink(missing_ok=True)
        return False
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        raise
    return True
