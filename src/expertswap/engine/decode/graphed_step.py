"""The decode step as CUDA graphs: two per MoE layer, with the exact policy's loads between them.

Eager decoding on a GPU is Python and kernel launches (measured on an H200, OLMoE shape, 16
layers: ~1,700 launches a token, the GPU busy 9% of the time). Here one token is a short list of
pieces, each captured once and replayed: the embedding; per layer the attention, router and
routing bookkeeping (piece A), then the experts and residual (piece B); the final norm and head.
Between A and B of a layer whose committee is not full, the host reads the routing (one small
copy) and loads what is missing, exactly as the eager path does; with every committee full the
token is queued without a single host sync. Piece A also applies the next MoE layer's router to
this layer's hidden state: the experts it names are copied from pinned host memory on the copier's
stream while this layer's experts and the next attention compute, and the device waits for that
copy only before the next layer's loads; whatever the guess missed is still loaded exactly
(``prediction`` counts its precision and recall). Shapes never change (a cache of fixed capacity, the
position a device tensor), so the graphs stay valid until a resize moves the slots or a longer
reply needs a larger cache; then they are captured again.

Off CUDA the same pieces run eagerly: the decomposition is tested on the CPU in CI.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from expertswap.engine.decode.compact_step import CompactModel, KVCache, Layer, MoEBlock, cache_size
from expertswap.engine.moe.committee import Committee
from expertswap.engine.moe.runtime import Runtime

_TRIAL = 256  # predictions before their precision decides whether prefetching goes on
_PREFETCH_PRECISION = 0.8


@dataclass
class _Piece:
    run: Callable[[], None]
    after: Callable[[], None] | None = None  # host work between this piece and the next (a piece A's loads)
    graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self.graph is None:
            self.run()
        else:
            self.graph.replay()
        if self.after is not None:
            self.after()


@dataclass
class Prediction:
    """How well layer L's hidden state, through layer L+1's router, named the experts L+1 then used."""

    predicted: int = 0
    used: int = 0
    right: int = 0

    @property
    def precision(self) -> float:
        return self.right / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.right / self.used if self.used else 1.0


class GraphedDecode:
    """One reply's decode steps on a persistent cache; pieces captured on CUDA, run eagerly elsewhere."""

    def __init__(self, compact: CompactModel, runtime: Runtime) -> None:
        self.compact = compact
        self.runtime = runtime
        self.cuda = compact.device.type == "cuda"
        self.cache: KVCache | None = None
        self.pieces: list[_Piece] = []
        self.key: tuple | None = None
        self.captures = 0  # how often the pieces were (re)captured: tests and benchmarks read it
        self.prediction = Prediction()
        self._guess: dict[int, set[int]] = {}  # layer -> experts predicted for it this token
        self._joins: dict[int, Callable[[], None]] = {}  # layer -> make the device wait for its prefetch
        self._pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self._token = torch.zeros(1, dtype=torch.long, device=compact.device)
        self._position = torch.zeros(1, dtype=torch.long, device=compact.device)

    def usable(self) -> bool:
        """The exact policy in bf16/fp16 on plain slots: other policies and packed slots decide per token on the
        host in ways a graph cannot hold, and transformers' grouped_mm falls back to host-side offsets in fp32."""
        runtime = self.runtime
        return runtime.policy.graphable and runtime.trace is None and not runtime.packed_slots and (
            not self.cuda or self.compact.dtype in (torch.bfloat16, torch.float16)
        )

    def new_cache(self, capacity: int) -> KVCache:
        """The reply's cache: the persistent one (length 0), grown to a bucket that holds ``capacity``."""
        size = cache_size(capacity)
        if self.cache is None or self.cache.capacity < size:
            self.cache, self.pieces, self.key = None, [], None  # the old graphs point into the old cache
            self.cache = self.compact.new_cache(size, zeroed=True)
        self.cache.length = 0
        return self.cache

    @property
    def position(self) -> torch.Tensor:
        """The device tensor holding the position the coming step decodes (set before it runs, warm-ups too)."""
        return self._position

    def step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits [1, vocab] of ``token`` at the cache's next position; the cache grows by one."""
        assert cache is self.cache and cache.length < cache.capacity
        self._token.fill_(token)
        self._position.fill_(cache.length)  # before a capture too: its warm-up writes this position's keys
        key = (id(cache), self.runtime.policy.name, self.runtime.eviction,
               tuple(c.version for c in self._committees()))
        if key != self.key:
            self._build()
            self.key = key
        for piece in self.pieces:
            piece()
        cache.length += 1
        return self._logits

    def _between(self, committee: Committee, routing: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                 following: Committee | None) -> None:
        """After a layer's routing: load its misses (exact), and start the next layer's predicted experts."""
        if join := self._joins.pop(committee.layer, None):
            join()  # its prefetch lands before any load or read of these slots
        if committee.slots.full and (following is None or following.slots.full):
            return
        index, guess = routing()
        k = index.numel()
        host = (torch.cat([index.flatten(), guess.flatten()]) if guess is not None else index.flatten()).cpu()
        needed = sorted(set(host[:k].tolist()) - {-1})
        if (predicted := self._guess.pop(committee.layer, None)) is not None:
            self.prediction.predicted += len(predicted)
            self.prediction.used += len(needed)
            self.prediction.right += len(predicted & set(needed))
        if not committee.slots.full:
            committee.make_resident(needed)
        if guess is not None and following is not None and not following.slots.full:
            self._guess[following.layer] = set(host[k:].tolist())
            if self._prefetch_pays() and (join := following.prefetch(sorted(self._guess[following.layer]))):
                self._joins[following.layer] = join

    def _prefetch_pays(self) -> bool:
        """A wrong guess costs a copy and evicts an expert that may be needed: prefetch only while guesses are good.

        Measured on random-weight OLMoE shapes (H200): precision 0.69, and prefetching did not pay.
        """
        return self.prediction.predicted < _TRIAL or self.prediction.precision >= _PREFETCH_PRECISION

    # ---- building the pieces -----------------------------------------------------------------
    def _committees(self) -> list[Committee]:
        return [layer.mlp.experts for layer in self.compact.layers if isinstance(layer.mlp, MoEBlock)]

    def _build(self) -> None:
        compact, cache = self.compact, self.cache
        assert cache is not None
        x = torch.zeros(1, compact.embed.weight.shape[1], dtype=compact.dtype, device=compact.device)
        held: dict[str, Any] = {}  # tensors one piece leaves for the next (static under capture)

        def embed() -> None:
            x.copy_(compact.embed(self._token))
            held["cos"], held["sin"] = (t[0] for t in compact.rotary(x[None], self._position[None]))

        pieces = [_Piece(embed)]
        blocks = {i: layer.mlp for i, layer in enumerate(compact.layers) if isinstance(layer.mlp, MoEBlock)}
        following = {i: blocks[j] for i, j in itertools.pairwise(blocks)}
        for i, layer in enumerate(compact.layers):
            pieces.extend(self._layer_pieces(i, layer, x, held, cache, following.get(i)))
        self._guess, self._joins = {}, {}

        def head() -> None:
            held["logits"] = compact.head(compact.norm(x))

        pieces.append(_Piece(head))
        if self.cuda:
            self._capture(pieces)
        self.pieces = pieces
        self._held = held
        self.captures += 1

    def _layer_pieces(self, i: int, layer: Layer, x: torch.Tensor, held: dict[str, Any],
                      cache: KVCache, following: MoEBlock | None) -> list[_Piece]:
        attention, mlp = layer.attention, layer.mlp
        position = self._position

        def attend() -> tuple[torch.Tensor, torch.Tensor]:
            h = x + attention.step(layer.norm_in(x), held["cos"], held["sin"], cache.keys[i], cache.values[i], position)
            return h, layer.norm_mid(h)

        if not isinstance(mlp, MoEBlock):
            def dense() -> None:
                h, y = attend()
                x.copy_(h + mlp(y))

            return [_Piece(dense)]
        committee: Committee = mlp.experts

        def route() -> None:
            h, y = attend()
            _, weights, index = mlp.router(y)
            index, weights, _ = committee.observe(y, index, weights)
            held[f"{i}"] = (h, y, index, weights)
            if following is not None:  # the next MoE layer's router on this hidden state: its likely experts
                held[f"{i}:next"] = following.predict(y)

        def experts() -> None:
            h, y, index, weights = held[f"{i}"]
            out = committee.compute(y, index, weights)
            if mlp.shared is not None:
                out = out + mlp.shared(y)
            x.copy_(h + out)

        def routing() -> tuple[torch.Tensor, torch.Tensor | None]:
            return held[f"{i}"][2], held.get(f"{i}:next")

        def after() -> None:
            self._between(committee, routing, following.experts if following else None)

        return [_Piece(route, after), _Piece(experts)]

    def _capture(self, pieces: list[_Piece]) -> None:
        """Warm up on a side stream (bookkeeping restored after), then capture each piece in order."""
        committees = self._committees()
        saved = [[t.clone() for t in c.cache.device_state()] for c in committees]
        stream = torch.cuda.Stream(self.compact.device)
        stream.wait_stream(torch.cuda.current_stream(self.compact.device))
        with torch.cuda.stream(stream):
            for piece in pieces:
                piece.run()
        torch.cuda.current_stream(self.compact.device).wait_stream(stream)
        torch.cuda.synchronize(self.compact.device)
        for committee, state in zip(committees, saved, strict=True):
            for tensor, value in zip(committee.cache.device_state(), state, strict=True):
                tensor.copy_(value)
        for piece in pieces:
            piece.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(piece.graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                piece.run()

    @property
    def _logits(self) -> torch.Tensor:
        return self._held["logits"]
