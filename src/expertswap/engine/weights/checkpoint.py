"""Read a model folder's safetensors headers and single experts' bytes without loading whole files.

Expert bytes are read with plain positioned reads straight into a tensor (pinned on CUDA), so
nothing but the experts asked for is ever brought into memory and file pages do not pile up in
the process's resident set the way a long-lived mmap would. Reads, unlike a mapping, also survive
the file changing under them: a truncated or rewritten file is a ``ModelFormatError`` on the next
read, where touching a mapped page past a new end of file kills the process with SIGBUS.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertswap.engine.weights.families import Family, family_for
from expertswap.engine.weights.folder import check_model_folder, read_json_object
from expertswap.engine.weights.validate import check_header_entry, check_moe_config, check_raw_config
from expertswap.protocol.errors import ModelFormatError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: file, absolute byte offset, dtype and shape."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def read_config(model_dir: str | os.PathLike) -> tuple[Path, Any, Family]:  # Any: each family's config class
    """The checked folder, its config (never remote code) and its supported family, or a typed error."""
    from transformers import AutoConfig

    folder = check_model_folder(model_dir)
    raw = read_json_object(folder / "config.json", "the model config")
    architectures = raw.get("architectures")
    family = family_for(str(raw.get("model_type") or ""),
                        [str(a) for a in architectures] if isinstance(architectures, list) else None)
    check_raw_config(raw, AutoConfig.for_model(family.model_type))
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a config it cannot use
        raise ModelFormatError(f"cannot read {folder / 'config.json'}: {exc}".splitlines()[0]) from exc
    check_moe_config(config)
    return folder, config, family


class Checkpoint:
    """Index of every tensor in a folder's safetensors files (or in ``files`` of it), validated against the file
    sizes."""

    def __init__(self, folder: Path, files: list[Path] | None = None) -> None:
        self.folder = folder
        self.entries: dict[str, TensorEntry] = {}
        self._stamps: dict[Path, tuple[int, int, int]] = {}  # each file as indexed: a rewrite or a replacement
        for file in sorted(folder.glob("*.safetensors")) if files is None else files:
            self._stamps[file] = _stamp(file.stat())
            self.entries.update(_read_header(file))
        self._handles: dict[Path, tuple[threading.Lock, io.FileIO]] = {}
        self._handles_lock = threading.Lock()

    def stamps(self) -> list[tuple[str, int, int]]:
        """Each file's name, size and modification time (ns), as indexed."""
        return [(file.name, size, mtime) for file, (_, size, mtime) in sorted(self._stamps.items())]

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def entry(self, key: str) -> TensorEntry:
        try:
            return self.entries[key]
        except KeyError:
            raise ModelFormatError(f"weight {key!r} is missing from the safetensors files in {self.folder}") from None

    def read(self, entry: TensorEntry, index: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read a whole tensor, or slice ``index`` of its first dimension, into ``out`` if given."""
        shape, offset = entry.shape, entry.offset
        if index is not None:
            shape = shape[1:]
            offset += index * (entry.nbytes // entry.shape[0])
        result = out if out is not None else torch.empty(shape, dtype=entry.dtype)
        if tuple(result.shape) != tuple(shape) or result.dtype != entry.dtype:
            raise ValueError(f"buffer {tuple(result.shape)} {result.dtype} does not fit {shape} {entry.dtype}")
        view = result.view(-1).view(torch.uint8).numpy().data
        lock, handle = self._handle(entry.file)
        with lock:
            if _stamp(os.fstat(handle.fileno())) != self._stamps[entry.file]:
                raise ModelFormatError(f"{entry.file.name} changed on disk after the model was loaded (a "
                                       "re-download or a sync?): load the model again")
            handle.seek(offset)
            got = handle.readinto(view)
        if got != len(view):
            raise ModelFormatError(f"{entry.file.name} ended early: it is truncated or corrupt")
        return result

    def close(self) -> None:
        with self._handles_lock:
            for _, handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def _handle(self, file: Path) -> tuple[threading.Lock, io.FileIO]:
        with self._handles_lock:
            if file not in self._handles:
                self._handles[file] = (threading.Lock(), open(file, "rb", buffering=0))  # noqa: SIM115 (closed by close())
            return self._handles[file]


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_header(file: Path) -> dict[str, TensorEntry]:
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{file.name} is empty or truncated (not a safetensors file)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ModelFormatError(f"{file.name} has a corrupt header (not a safetensors file, or truncated)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFormatError(f"{file.name} has a corrupt header (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{file.name} has a corrupt header (not a JSON object)")
    base = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, begin, end = check_header_entry(file.name, key, info, size - base)
        if dtype not in _DTYPES:
            raise ModelFormatError(f"{file.name}: tensor {key!r} has unsupported dtype {dtype}")
        entry = TensorEntry(file, base + begin, _DTYPES[dtype], shape)
        if entry.nbytes != end - begin:
            raise ModelFormatError(f"{file.name}: tensor {key!r} has inconsistent size in its header")
        entries[key] = entry
    return entries
