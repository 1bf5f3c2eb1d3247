"""Miss policies: what a routed expert that is not resident costs, chosen once by name.

A ``MissPolicy`` object is picked (and its rules checked) when the engine loads or the user switches;
the committee asks it what to do with a decode step's misses, instead of comparing names on every
forward. The tensor functions below are what substitute and skip do to the router's choice: routing
in, routing out, no module state, no host sync, tested with small tensors alone.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn

from expertswap.protocol.errors import PolicyError
from expertswap.protocol.options import POLICIES, THRESHOLD_POLICIES


class MissHandler(Protocol):
    """The committee's ways of computing a step whose misses may not be loaded."""

    def run_substituted(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                        resident: torch.Tensor) -> torch.Tensor: ...
    def run_with_host(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                      resident: torch.Tensor) -> torch.Tensor: ...
    def run_low_precision(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                          resident: torch.Tensor) -> torch.Tensor: ...


class MissPolicy:
    """``exact``: every routed expert is computed as the model has it; a miss loads it, also while decoding."""

    name: ClassVar[str] = "exact"
    loads_on_miss: ClassVar[bool] = True  # False: decoding never loads (the prompt still does, exactly)
    needs_cuda: ClassVar[bool] = False
    needs_rows: ClassVar[bool] = False  # needs every layer on the per-expert row path
    graphable: ClassVar[bool] = True  # the CUDA-graph decode step holds it (its loads sit between the pieces)
    pinnable: ClassVar[bool] = False  # a static committee may serve it: a miss never loads, even in a prompt
    by_residency: ClassVar[bool] = False  # its output depends on which experts are resident (a budget changes it)

    def __init__(self, skip_threshold: float = 0.0) -> None:
        self.skip_threshold = skip_threshold

    @property
    def routing_threshold(self) -> float:
        """Routings below this weight are dropped before anything loads (the ``THRESHOLD_POLICIES`` drop any)."""
        return self.skip_threshold if self.name in THRESHOLD_POLICIES else 0.0

    def without_loads(self, layer: MissHandler, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                      resident: torch.Tensor) -> torch.Tensor | None:
        """The output of a step whose misses may not load, or None: load them (the policies that load)."""
        return None

    @classmethod
    def allowed(cls, device_type: str, rows: bool) -> bool:
        return (device_type == "cuda" or not cls.needs_cuda) and (rows or not cls.needs_rows)


class Skip(MissPolicy):
    """``skip`` (PC-MoE's skippable computation): routings under the threshold are dropped, the rest load."""

    name = "skip"
    graphable = False  # which routings it drops is decided per token on the host


class Substitute(MissPolicy):
    """``substitute`` (SwapMoE's virtual experts): a decode miss goes to the best resident expert instead."""

    name = "substitute"
    loads_on_miss = False
    graphable = False
    by_residency = True
    pinnable = True

    def without_loads(self, layer: MissHandler, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                      resident: torch.Tensor) -> torch.Tensor | None:
        return layer.run_substituted(hidden, index, weights, resident)


class HostCompute(MissPolicy):
    """``cpu``: a decode miss is computed on the CPU from its host copy while the GPU computes the rest."""

    name = "cpu"
    loads_on_miss = False
    needs_cuda = True
    graphable = False
    by_residency = True

    def without_loads(self, layer: MissHandler, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                      resident: torch.Tensor) -> torch.Tensor | None:
        return layer.run_with_host(hidden, index, weights, resident)


class LowBit(MissPolicy):
    """``lowbit`` (HOBBIT's idea): a decode miss is computed from its nf4 copy; nothing loads or is evicted."""

    name = "lowbit"
    loads_on_miss = False
    needs_rows = True
    graphable = False
    by_residency = True

    def without_loads(self, layer: MissHandler, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                      resident: torch.Tensor) -> torch.Tensor | None:
        return layer.run_low_precision(hidden, index, weights, resident)


_KINDS: tuple[type[MissPolicy], ...] = (MissPolicy, Substitute, Skip, HostCompute, LowBit)
_BY_NAME = {kind.name: kind for kind in _KINDS}
assert tuple(_BY_NAME) == POLICIES  # the names front ends list, in their order


def choose_policy(name: str, device_type: str, skip_threshold: float = 0.0, rows: bool = True) -> MissPolicy:
    """The policy called ``name``, checked against the device and the experts' layout: the one place its rules live.

    ``rows``: every layer's experts run on the per-expert row path (what ``lowbit`` computes misses with).
    """
    kind = _BY_NAME.get(name)
    if kind is None:
        raise PolicyError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    if kind.needs_cuda and device_type != "cuda":
        raise PolicyError(f"policy {name} computes misses on the CPU while the GPU works: it needs --device cuda")
    if kind.needs_rows and not rows:
        raise PolicyError(f"policy {name} is not supported for this model's experts yet")
    if not 0.0 <= skip_threshold < 1.0:
        raise PolicyError(f"skip threshold must be in [0, 1), got {skip_threshold}")
    return kind(skip_threshold)


def available_policies(device_type: str, rows: bool) -> tuple[str, ...]:
    """The names ``choose_policy`` takes on this device and layout, in the order users see them."""
    return tuple(name for name in POLICIES if _BY_NAME[name].allowed(device_type, rows))


def skip_routings(index: torch.Tensor, weights: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PC-MoE skippable computation: drop routings below ``threshold``, never a token's strongest.

    Returns (index with dropped routings as -1, weights renormalised to the same sum per token, how
    many were dropped). A token that drops nothing keeps its weights bit for bit.
    """
    keep = (weights >= threshold) | (weights == weights.max(dim=1, keepdim=True).values)
    dropped = ~keep
    total = weights.sum(dim=1, keepdim=True)
    kept = (weights * keep).sum(dim=1, keepdim=True)
    renormalised = weights * keep * (total / kept)
    weights = torch.where(dropped.any(dim=1, keepdim=True), renormalised, weights)
    return index.masked_fill(dropped, -1), weights, dropped.sum()


def substitute_misses(index: torch.Tensor, resident: torch.Tensor, scores: torch.Tensor,
                      is_resident: torch.Tensor) -> torch.Tensor:
    """SwapMoE virtual experts: each missing routing goes to the best-scored resident expert not yet used.

    ``index`` [T, k] expert ids; ``resident`` [T, k] whether each routing's expert is resident;
    ``scores`` [T, E] how much the router (or importance) favours each expert; ``is_resident`` [E].
    """
    scores = scores.masked_fill(~is_resident, float("-inf"))
    taken = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, resident)
    out = index.clone()
    for k in range(index.shape[1]):
        miss = ~resident[:, k]
        choice = scores.masked_fill(taken, float("-inf")).argmax(dim=1)
        out[:, k] = torch.where(miss, choice, index[:, k])
        taken |= nn.functional.one_hot(choice, scores.shape[1]).bool() & miss[:, None]
    return out
