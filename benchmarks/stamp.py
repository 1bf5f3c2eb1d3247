"""The line every result file starts with: when, on what machine, with which versions."""

from __future__ import annotations

import os
import platform
import time

import torch
import transformers


def stamp(device: str = "cpu") -> str:
    """Date, CPU (and GPU when ``device`` is CUDA), torch and transformers versions."""
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores{gpu}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")
