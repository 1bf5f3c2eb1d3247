"""Which device the engine computes on: the one default both CLIs and the app take, and a checked choice."""

from __future__ import annotations

import importlib.util

import torch

from expertswap.protocol.errors import DeviceError


def default_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """A torch device from a user's string, or a clear error if it is unknown or absent."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}: use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r} is not supported: use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device cuda was asked for, but no CUDA GPU is available to this torch build")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) found")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def triton_serves(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether our Triton kernels serve here: CUDA, with Triton (it ships with torch's CUDA builds), and for
    kernels on the model's tensors its dtype bf16 or fp16 (the CUDA-graph step's; fp32 keeps torch's ops)."""
    return (device.type == "cuda" and importlib.util.find_spec("triton") is not None
            and dtype in (None, torch.bfloat16, torch.float16))
