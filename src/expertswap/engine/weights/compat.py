"""Every private torch and transformers hook the engine uses, in one place, with the versions checked against.

Each one is a measured choice (the docstrings say why); none is public API, so any of them may change
without notice. ``tests/test_compat.py`` fails loudly when an installed version differs from ``CHECKED``:
re-check every hook below against the new version, then update ``CHECKED``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

CHECKED = {"torch": "2.13.0", "transformers": "5.23.0"}

_INIT_LOCK = threading.Lock()


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 L2 norms of many tensors in one kernel (``torch._foreach_norm``): one launch, not one per expert."""
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def experts_implementation(config: object) -> str | None:
    """transformers' choice of expert kernel for a model (``config._experts_implementation``)."""
    return getattr(config, "_experts_implementation", None)


def set_expert_parallel(experts: Any, on: bool) -> None:  # a transformers experts module
    """``_is_expert_parallel``: when on, grouped_mm skips expert ids >= num_experts (our sentinel for "no slot")."""
    experts._is_expert_parallel = on


def mark_initialised(module: Any) -> None:  # a transformers module
    """``_is_hf_initialized``: transformers then leaves the module's (absent) weights alone after loading."""
    module._is_hf_initialized = True


@contextmanager
def after_init(cls: type[nn.Module], hook: Callable[[nn.Module], None]) -> Iterator[None]:
    """Run ``hook`` on every ``cls`` built inside the block (``cls.__init__`` patched; one block at a time)."""
    original = cls.__init__

    def init(self: nn.Module, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        hook(self)

    with _INIT_LOCK:
        cls.__init__ = init  # type: ignore[method-assign]
        try:
            yield
        finally:
            cls.__init__ = original  # type: ignore[method-assign]


def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def reorder_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in oneDNN's blocked layout for a matmul with a few rows (``_reorder_linear_weight``)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def linear_pointwise(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rows`` [N, in] @ a reordered ``weight`` (``torch.ops.mkldnn._linear_pointwise``)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
