"""Moving experts' weights from host tensors into committee slots: the copying, apart from the bookkeeping.

On CUDA the copies of one batch are queued behind the work already queued (the slots' old experts
may still be read), on the copier's own stream for background swaps or on the current stream for
misses; the current stream then waits for them, so whatever runs next reads the new experts, and
``finish`` waits for the batch once the caller's bookkeeping has overlapped the transfer. Pageable
sources go through pinned staging buffers, reused batch after batch. On the CPU, plain copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

Writes = Sequence[tuple[int, Mapping[str, torch.Tensor]]]  # (slot, {parameter name: one expert's tensor})


class Copier:
    """One per engine: the background stream and the staging buffers the swapper's batches use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staging: dict[tuple[str, tuple[int, ...], torch.dtype, int], torch.Tensor] = {}

    def release(self) -> None:
        """Drop the pinned staging buffers (the engine is closing)."""
        self._staging.clear()

    def stage(self, tensors: Mapping[str, torch.Tensor], position: int) -> dict[str, torch.Tensor]:
        """Pinned copies of pageable host tensors (one buffer set per place in a batch), for async copies."""
        if self.stream is None:
            return dict(tensors)
        staged = {}
        for name, tensor in tensors.items():
            if tensor.is_pinned():
                staged[name] = tensor
                continue
            key = (name, tuple(tensor.shape), tensor.dtype, position)
            if key not in self._staging:
                self._staging[key] = torch.empty(tensor.shape, dtype=tensor.dtype).pin_memory()
            staged[name] = self._staging[key].copy_(tensor)
        return staged

    def copy(self, slots: Mapping[str, torch.Tensor], writes: Writes, background: bool = False) -> Callable[[], None]:
        """Queue each write into ``slots[name][slot]`` (on the copier's stream when ``background``); returns
        ``finish``, which waits for the batch."""
        if self.device.type != "cuda":
            for slot, tensors in writes:
                for name, tensor in tensors.items():
                    slots[name][slot].copy_(tensor)
            return lambda: None
        current = torch.cuda.current_stream(self.device)
        side = self.stream if background and self.stream is not None else current
        side.wait_stream(current)  # queued kernels may still read the slots' old experts
        with torch.cuda.stream(side):
            for slot, tensors in writes:
                for name, tensor in tensors.items():
                    slots[name][slot].copy_(tensor, non_blocking=True)
        current.wait_stream(side)  # what runs next reads the new experts
        return side.synchronize  # sources (staging buffers) may be reused after it, and timings are true
