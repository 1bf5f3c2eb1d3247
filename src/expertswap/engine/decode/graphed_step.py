"""The decode step as CUDA graphs: one per token when no host work sits in it, else two per MoE layer.

Eager decoding on a GPU is Python and kernel launches (measured on an H200, OLMoE shape, 16
layers: ~1,700 launches a token, the GPU busy 9% of the time). Here one token is a list of pieces,
each captured once and replayed: the embedding; per layer the attention, router and routing
bookkeeping (piece A), then the experts and residual (piece B); the final norm and head. Pieces with
no host work between them are captured as one graph.

- Host-free (every expert in the pinned RAM tier, bf16/fp16, SwiGLU experts in stacked slots): piece B
  runs the zero-copy kernels (``moe/zero_copy.py``): a miss is read from host memory by the kernel
  and written into its victim slot on the way, so a token is ONE graph at every budget, and the
  host reads what moved once per token (``_settle``).
- Otherwise, between A and B of a layer whose committee is not full, the host reads the routing (one
  small copy) and loads what is missing from the store, exactly as the eager path does; with every
  committee full the token is one graph again.

Shapes never change (a cache of fixed capacity, the position a device tensor), so the graphs stay valid
until a resize moves the slots or a longer reply needs a larger cache; then they are captured again.
Off CUDA the same pieces run eagerly: the decomposition is tested on the CPU in CI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from expertswap.engine.decode.compact_step import CompactModel, KVCache, Layer, MoEBlock, cache_size
from expertswap.engine.moe import zero_copy
from expertswap.engine.moe.committee import Committee
from expertswap.engine.moe.runtime import Runtime


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
        self._zero_copy: dict[int, zero_copy.ZeroCopyExperts] = {}  # layer -> its kernels, when every layer has them
        self._log = torch.empty(0)  # [MoE layers, k, 3]: what the host-free step brought in, per layer
        self._log_host: list[torch.Tensor] = []  # its host copies, one per step in flight (two)
        self._settles = False  # host-free with a committee not full: the host reads the log after each token
        self.graphs_per_token = 0  # graphs one token replays: tests and benchmarks read it
        self._pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self._token = torch.zeros(1, dtype=torch.long, device=compact.device)  # the step's; its greedy pick after
        self._position = torch.zeros(1, dtype=torch.long, device=compact.device)
        pinned = self.cuda  # host copies the GPU writes while the host does other work
        self._picked = torch.zeros(2, dtype=torch.long, pin_memory=pinned)
        self._done = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self._queued = 0  # steps queued so far: which host copies a step writes

    def usable(self) -> bool:
        """The exact policy in bf16/fp16 on plain slots: other policies and packed slots decide per token on the
        host in ways a graph cannot hold, and transformers' grouped_mm falls back to host-side offsets in fp32."""
        runtime = self.runtime
        return runtime.policy.graphable and runtime.trace is None and not runtime.packed_slots and (
            not self.cuda or self.compact.dtype in (torch.bfloat16, torch.float16)
        )

    def new_cache(self, capacity: int, start: KVCache | None = None) -> KVCache:
        """The reply's cache: the persistent one, grown to a bucket that holds ``capacity``, holding ``start``'s
        positions (a parked conversation's, or its own as they were before it grew) or none."""
        size = cache_size(capacity)
        if self.cache is None or self.cache.capacity < size:
            self.cache, self.pieces, self.key = None, [], None  # the old graphs point into the old cache
            self.cache = self.compact.new_cache(size, zeroed=True)
        if start is None:
            self.cache.length = 0
        elif start is not self.cache:
            start.copy_into(self.cache)
        return self.cache

    @property
    def position(self) -> torch.Tensor:
        """The device tensor holding the position the coming step decodes (set before it runs, warm-ups too)."""
        return self._position

    def step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits [1, vocab] of ``token`` at the cache's next position; the cache grows by one."""
        self.ahead(token, cache)()
        return self._logits

    def ahead(self, token: int | None, cache: KVCache) -> Callable[[], int]:
        """Queue the step of ``token`` (None: of the token the step before picked, still on the device) at the
        cache's next position, and return its finishing: it waits for the step, lets the host follow what it
        brought in, and returns its greedy pick. Until then the host is free, and may queue the next step.

        Each step copies its pick and its log to host buffers of its own (two, used in turn), so finishing one
        step while the next runs reads what that step wrote; the greedy pick is the argmax the host would take.
        """
        assert cache is self.cache and cache.length < cache.capacity
        if token is not None:
            self._token.fill_(token)
        self._position.fill_(cache.length)  # before a capture too: its warm-up writes this position's keys
        key = (id(cache), self.runtime.policy.name, self.runtime.eviction,
               tuple(c.version for c in self._committees()))
        if key != self.key:
            self._build()
            self.key = key
        for piece in self.pieces:
            piece()
        turn = self._queued % 2
        self._queued += 1
        self._picked[turn].copy_(self._token[0], non_blocking=True)
        log = self._log_host[turn] if self._settles else None
        if log is not None:
            log.copy_(self._log, non_blocking=True)
        done = self._done[turn] if self.cuda else None
        if done is not None:
            done.record()
        cache.length += 1

        def finish() -> int:
            if done is not None:
                done.synchronize()
            if log is not None:
                self._settle(log)
            return int(self._picked[turn])

        return finish

    def _settle(self, log: torch.Tensor) -> None:
        """The host follows what a token brought in (``log``: the host's copy of every layer's log, written)."""
        for committee, rows in zip(self._committees(), log.tolist(), strict=True):
            if placed := [tuple(row) for row in rows if row[0] >= 0]:
                committee.settle(placed)

    @staticmethod
    def _between(committee: Committee, index: torch.Tensor) -> None:
        """After a layer's routing, when its committee is not full: load what it misses (exact), from the store."""
        if not committee.slots.full:
            committee.make_resident(committee.cache.needed(index))

    # ---- building the pieces -----------------------------------------------------------------
    def _committees(self) -> list[Committee]:
        return [layer.mlp.experts for layer in self.compact.layers if isinstance(layer.mlp, MoEBlock)]

    def _build(self) -> None:
        compact, cache = self.compact, self.cache
        assert cache is not None
        x = torch.zeros(1, compact.embed.weight.shape[1], dtype=compact.dtype, device=compact.device)
        held: dict[str, Any] = {}  # tensors one piece leaves for the next (static under capture)

        masked = not all(layer.attention.fused_decode for layer in compact.layers)  # else attention reads up to it
        held["mask"] = None

        def embed() -> None:
            x.copy_(compact.embed(self._token))
            held["cos"], held["sin"] = (t[0] for t in compact.rotary(x[None], self._position[None]))
            if masked:  # all layers' mask, additive as attention would make it of a boolean one in each layer
                seen = torch.arange(cache.capacity, device=x.device) <= self._position
                mask = torch.zeros(1, cache.capacity, dtype=x.dtype, device=x.device)
                held["mask"] = mask.masked_fill_(~seen, -torch.inf)

        committees = self._committees()
        kernels = self.cuda and all(zero_copy.supports(c) for c in committees)  # dtypes and layout checked there
        self._zero_copy = {}
        if kernels:
            self._log = torch.full((len(committees), max(c.top_k for c in committees), 3), -1, dtype=torch.long,
                                   device=compact.device)
            self._log_host = [torch.empty(self._log.shape, dtype=torch.long).pin_memory() for _ in range(2)]
            self._zero_copy = {c.layer: zero_copy.ZeroCopyExperts(c, row) for c, row in zip(committees, self._log,
                                                                                          strict=True)}
        self._settles = kernels and not all(c.slots.full for c in committees)  # full stays so until a resize
        pieces = [_Piece(embed)]
        for i, layer in enumerate(compact.layers):
            pieces.extend(self._layer_pieces(i, layer, x, held, cache))

        def head() -> None:
            held["logits"] = compact.head(compact.norm(x))
            torch.argmax(held["logits"], dim=-1, out=self._token)  # the greedy pick: the next step's token

        pieces.append(_Piece(head))
        pieces = _joined(pieces)
        if self.cuda:
            self._capture(pieces)
        self.pieces = pieces
        self.graphs_per_token = len(pieces) if self.cuda else 0
        self._held = held
        self.captures += 1

    def _layer_pieces(self, i: int, layer: Layer, x: torch.Tensor, held: dict[str, Any],
                      cache: KVCache) -> list[_Piece]:
        attention, mlp = layer.attention, layer.mlp
        position = self._position

        def attend() -> tuple[torch.Tensor, torch.Tensor]:
            out = attention.step(layer.norm_in(x), held["cos"], held["sin"], cache.keys[i], cache.values[i], position,
                                 held["mask"])
            return layer.norm_mid.after_add(x, out)

        if not isinstance(mlp, MoEBlock):
            def dense() -> None:
                h, y = attend()
                torch.add(h, mlp(y), out=x)

            return [_Piece(dense)]
        committee: Committee = mlp.experts
        kernels = self._zero_copy.get(committee.layer)

        def route() -> None:
            h, y = attend()
            _, weights, index = mlp.router(y)
            index, weights, _ = committee.observe(y, index, weights)
            held[f"{i}"] = (h, y, index, weights)

        def experts() -> None:
            h, y, index, weights = held[f"{i}"]
            if kernels and mlp.shared is None:
                kernels(y, index, weights, residual=(h, x))  # the pair sum adds h into x itself
                return
            out = kernels(y, index, weights) if kernels else committee.compute(y, index, weights)
            if mlp.shared is not None:
                out = out + mlp.shared(y)
            torch.add(h, out, out=x)

        def after() -> None:
            self._between(committee, held[f"{i}"][2])

        loads = not kernels and not committee.slots.full  # full stays full until a resize, which captures again
        return [_Piece(route, after if loads else None), _Piece(experts)]

    def _capture(self, pieces: list[_Piece]) -> None:
        """Warm up on a side stream (the routing bookkeeping restored after), then capture each piece in order."""
        committees = self._committees()
        saved = [[t.clone() for t in c.cache.device_state()] for c in committees]
        token = self._token.clone()  # the warm-up's head writes its pick there
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
        self._token.copy_(token)
        if self._settles:  # the warm-up's loads were real (their slots were written): the replay finds them resident
            self._settle(self._log.cpu())
        for piece in pieces:
            piece.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(piece.graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                piece.run()

    @property
    def _logits(self) -> torch.Tensor:
        return self._held["logits"]


def _joined(pieces: list[_Piece]) -> list[_Piece]:
    """Consecutive pieces with no host work between them as one: one graph for all of them."""
    runs: list[list[_Piece]] = [[]]
    for piece in pieces:
        runs[-1].append(piece)
        if piece.after is not None:
            runs.append([])
    return [run[0] if len(run) == 1 else _Piece(_in_order([p.run for p in run]), run[-1].after)
            for run in runs if run]


def _in_order(runs: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for each in runs:
            each()

    return run
