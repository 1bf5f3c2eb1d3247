"""Keeping the process's resident memory to what the engine holds: two Linux (glibc) measures.

- Large allocations always come from their own mapping, so freeing one gives its memory back.
  glibc's default threshold rises after each large free, after which expert-sized buffers come
  from the heap and are never returned: measured on the OLMoE shape, 4 layers, on the CPU, a
  reply's resident set grew 230 MiB as experts were packed (16 MiB with the threshold fixed).
- Pages of the checkpoint's memory map that a weight occupied are dropped once the engine holds
  its own (packed or fused) copy: transformers leaves CPU weights as views of the mapped file, and
  those pages stayed resident beside the copies (328 MiB for the same model). They are clean file
  pages: dropping them loses nothing, and a later read would fault them back in from the file.
- What is left of the model in that map (embedding, norms, routers) is copied out too, so no page
  of the file stays mapped: the kernel maps neighbouring cached pages around every fault, and expert
  reads of the same file filled that cache (the default model kept 133 MiB of its file mapped after a
  prompt at 25%, for 56 MiB of weights still read there).
Elsewhere the first two are no-ops, and the third is a plain copy of every CPU weight: where the
process's mappings cannot be read, none may be left as a view of its file.

One more measure holds everywhere: oneDNN keeps a compiled kernel for every matmul shape it meets,
and ideep above it a computation with its scratch memory, 1024 of each by default. Each prompt
length is a new shape, so a server's or a chat's resident set grew 5-13 MiB with every distinct
prompt length and never shrank (733 to 2,192 MiB over 180 replies). ideep's cache holds most of the
memory and oneDNN's most of the speed (a prefill meets a shape per expert row count, reused across
layers), so they are capped apart; benchmarks/results/kernel-caches-default-cpu.md has the trade.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
_MADV_DONTNEED = 4
_ONE_MIB = 1 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "madvise") else None


_LIBC = _libc()


KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 128, "LRU_CACHE_CAPACITY": 32}  # oneDNN's, ideep's


def bound_kernel_caches() -> None:
    """Cap oneDNN's and ideep's kernel caches, unless the user set them. Both read their size when they make
    their first kernel, so this must run before the process's first CPU matmul."""
    for name, size in KERNEL_CACHES.items():
        os.environ.setdefault(name, str(size))


def return_large_frees() -> None:
    """Serve allocations of 1 MiB and more from their own mappings (given back to the system when freed)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _ONE_MIB)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings that have a file behind them."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drop the resident pages of these CPU tensors where they lie in a file mapping; returns the bytes dropped.

    Only whole pages inside a tensor are dropped (an edge page may hold a neighbour still in use).
    """
    if _LIBC is None or not tensors:
        return 0
    mappings = _file_mappings()
    page = mmap.PAGESIZE
    dropped = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided or not tensor.is_contiguous():
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in mappings):
            continue
        first, last = -(-start // page) * page, end // page * page
        if last > first and _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            dropped += last - first
    return dropped


def owned(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``tensor``, copied into the process's own memory (its file pages dropped) if a file mapping backs it.

    A mapped weight also dies with its file: truncating or rewriting the file under a loaded model turns
    the next read of it into SIGBUS, which kills the process. Where this process's mappings cannot be
    read (macOS, Windows), every CPU tensor is copied.
    """
    if tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return tensor
    if _LIBC is None:
        return tensor.clone()
    start = tensor.data_ptr()
    if not any(lo <= start < hi for lo, hi in (mappings if mappings is not None else _file_mappings())):
        return tensor
    copy = tensor.clone()
    drop_file_pages([tensor])
    return copy


def own_weights(model: torch.nn.Module) -> None:
    """Every CPU parameter and buffer of ``model`` ``owned``, one at a time (the peak grows by one tensor)."""
    mappings = _file_mappings() if _LIBC is not None else None
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.data = owned(param.data, mappings)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                module._buffers[name] = owned(buffer, mappings)
