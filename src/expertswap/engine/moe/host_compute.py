"""Compute one expert on the CPU from its host copy, with the family's own experts forward."""

from __future__ import annotations

import copy

import torch
from torch import nn

from expertswap.engine.weights.compat import set_expert_parallel
from expertswap.engine.weights.store import LayerExperts

_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


class HostExperts:
    """A one-slot CPU twin of a layer's experts module: the ``cpu`` policy's exact miss path.

    Built from the family's class with a one-expert config, so quirks such as GPT-OSS's clamped
    SwiGLU and biases are the family's own code, not a re-implementation.
    """

    def __init__(self, inner: nn.Module, spec: LayerExperts) -> None:
        config = copy.deepcopy(inner.config)
        for attr in _EXPERT_COUNT_ATTRS:
            if hasattr(config, attr):
                setattr(config, attr, 1)
        with torch.device("cpu"):
            self.module = type(inner)(config)
        set_expert_parallel(self.module, False)
        self.spec = spec

    def compute(self, tensors: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """The expert's output (unweighted) for each row of ``hidden``."""
        for p in self.spec.params:
            self.module.register_parameter(p.name, nn.Parameter(tensors[p.name].unsqueeze(0), requires_grad=False))
        rows = hidden.shape[0]
        index = torch.zeros((rows, 1), dtype=torch.long)
        weights = torch.ones((rows, 1), dtype=hidden.dtype)
        return self.module(hidden, index, weights)
