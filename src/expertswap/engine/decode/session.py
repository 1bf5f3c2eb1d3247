"""One sequence's forwards on one KV cache: the compact step where the family has one, else transformers.

A session appends tokens and returns their logits; ``mark``/``roll_back`` undo a step that failed
(out of memory) so that its retry sees the cache as it was. ``keep``, ``park`` and ``resume`` let a later
turn of the same conversation start from this one's cache (``prefixes``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from expertswap.engine.decode.compact_step import CompactModel, KVCache
from expertswap.engine.decode.graphed_step import GraphedDecode


class Session(Protocol):
    def run(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Logits [len(ids), vocab] (all) or [1, vocab] (the last position), on the model's device."""

    def runs_ahead(self) -> bool:
        """Whether ``ahead`` serves: single greedy tokens queued one step ahead of the host (the graphed step)."""

    def ahead(self, token: int | None) -> Callable[[], int]:
        """Queue the step of ``token`` (None: the token the last queued step picked); returns its finishing, which
        waits for it and returns its greedy pick."""

    def mark(self) -> object:
        """The cache's state before a step."""

    def roll_back(self, mark: object) -> bool:
        """Back to ``mark``; False if the cache cannot go back (a sliding window that dropped its past)."""

    def length(self) -> int:
        """Positions in the cache."""

    def keep(self, length: int) -> bool:
        """Only the first ``length`` positions stay; False if the cache cannot go back that far."""

    def park(self) -> None:
        """Hold the cache's positions in host memory, at their size, off the device and out of the shared cache
        (CUDA graphs) that the next session takes."""

    def resume(self, capacity: int) -> None:
        """Room for ``capacity`` positions on the model's device, the parked ones back in place."""

    def fork(self, capacity: int, length: int) -> Session | None:
        """A new session (resumed, for ``capacity`` positions) holding this parked one's first ``length``
        positions, this one unchanged; None if the cache cannot go back that far."""

    def nbytes(self) -> int:
        """Bytes the cache holds."""


class CompactSession:
    """The compact forward; single decode tokens through ``graphed`` (CUDA graphs) when it is given and usable."""

    def __init__(self, compact: CompactModel, capacity: int, graphed: GraphedDecode | None = None) -> None:
        self.compact = compact
        self.graphed = graphed
        self.cache = graphed.new_cache(capacity) if graphed is not None else compact.new_cache(capacity)
        self._parked = False

    def run(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        if len(ids) == 1 and self.graphed is not None and self.graphed.usable():
            return self.graphed.step(ids[0], self.cache)
        return self.compact.forward(torch.tensor(list(ids), device=self.compact.device), self.cache, all_logits)

    def runs_ahead(self) -> bool:
        return self.graphed is not None and self.graphed.usable()

    def ahead(self, token: int | None) -> Callable[[], int]:
        assert self.graphed is not None
        return self.graphed.ahead(token, self.cache)

    def mark(self) -> object:
        return self.cache.length

    def roll_back(self, mark: object) -> bool:
        self.cache.length = int(mark)  # type: ignore[call-overload]
        return True

    def length(self) -> int:
        return self.cache.length

    def keep(self, length: int) -> bool:
        self.cache.length = min(length, self.cache.length)
        return True

    def park(self) -> None:
        self.cache = self.cache.filled(torch.device("cpu"))
        self._parked = True

    def resume(self, capacity: int) -> None:
        held = self.cache
        if self.graphed is not None:
            self.cache = self.graphed.new_cache(capacity, held)
        elif self._parked:
            self.cache = self.compact.new_cache(capacity)
            held.copy_into(self.cache)
        else:
            self.cache.reserve(capacity)
        self._parked = False

    def fork(self, capacity: int, length: int) -> Session | None:
        assert self._parked, "a live graphed session holds the cache the copy would be made in"
        other = CompactSession(self.compact, capacity, self.graphed)
        KVCache(self.cache.keys, self.cache.values, min(length, self.cache.length)).copy_into(other.cache)
        return other

    def nbytes(self) -> int:
        return self.cache.nbytes()


class TransformersSession:
    """transformers' own forward and growing cache: families the compact step does not cover."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)

    def run(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        batch = torch.tensor([list(ids)], device=self.model.device)
        out = self.model(
            input_ids=batch, past_key_values=self.cache, use_cache=True, logits_to_keep=0 if all_logits else 1
        )
        return out.logits[0]

    def runs_ahead(self) -> bool:
        return False

    def ahead(self, token: int | None) -> Callable[[], int]:
        raise NotImplementedError("transformers' forward picks no token on the device")

    def mark(self) -> object:
        layers: Any = self.cache.layers  # attention layers only: every family the session serves
        return [layer.get_seq_length() for layer in layers]

    def roll_back(self, mark: object) -> bool:
        for layer, before in zip(self.cache.layers, mark, strict=True):  # type: ignore[call-overload]
            grown = layer.get_seq_length() - before
            if grown > 0:
                try:
                    layer.crop(-grown)
                except RuntimeError:  # a sliding-window layer that no longer keeps its past
                    return False
        return True

    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def keep(self, length: int) -> bool:
        layers: Any = self.cache.layers
        return self.roll_back([min(length, layer.get_seq_length()) for layer in layers])

    def park(self) -> None:
        self._move(torch.device("cpu"))

    def resume(self, capacity: int) -> None:
        self._move(self.model.device)  # transformers' cache grows as it goes

    def fork(self, capacity: int, length: int) -> Session | None:
        other = TransformersSession(self.model)
        other.cache = copy.deepcopy(self.cache)
        if not other.keep(length):
            return None
        other.resume(capacity)
        return other

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        layers: Any = self.cache.layers
        return [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor)]

    def _move(self, device: torch.device) -> None:
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.device != device:
                    setattr(layer, name, tensor.to(device))


class Sessions:
    """Where each reply's KV cache comes from: the compact step where the family has one (CUDA graphs for single
    decode tokens on a GPU), else transformers' own. ``release`` gives the graphs and fused weights back."""

    def __init__(self, model: PreTrainedModel, compact: CompactModel | None, graphed: GraphedDecode | None,
                 context: int | None) -> None:
        self.model = model
        self.compact = compact
        self.graphed = graphed
        self.context = context  # the model's context length, when its config gives one

    def new(self, tokens: int) -> Session:
        """A KV cache for ``tokens`` positions (at most the context)."""
        if self.compact is None:
            return TransformersSession(self.model)
        return CompactSession(self.compact, min(tokens, self.context) if self.context else tokens, self.graphed)

    def release(self) -> None:
        self.compact = self.graphed = None
