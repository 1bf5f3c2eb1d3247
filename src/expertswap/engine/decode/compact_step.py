"""A compact forward for the Llama-shaped MoE families: fused projections and a KV cache that never moves.

transformers' forward is written for every use (training, masks for padding, caches that grow by
concatenation); at one token per step its bookkeeping and separate q/k/v and gate/up matmuls cost
more than the arithmetic. This step, after gpt-fast, does only what a reply needs: one matmul for
q, k and v, one for each MLP's gate and up, keys and values written in place into a cache sized
for the reply, and attention over what is filled. The family's own modules still do everything
that differs between families (norms, rotary embedding, the router, the experts through the
committee), so there is one place per concern.

Supported: Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral (full attention). Other families keep
transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from expertswap.engine.decode import fused
from expertswap.engine.decode.attention_shapes import round_up, shape_step
from expertswap.engine.device import triton_serves
from expertswap.engine.weights.host_memory import drop_file_pages, owned
from expertswap.engine.weights.packed import Int8Matrix, Matrix, linear, pack, packing_pays
from expertswap.engine.weights.quantize import int8_rows

if TYPE_CHECKING:
    from expertswap.engine.moe.committee import Committee

SUPPORTED = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")
_GROW = 256  # caches hold a multiple of this many positions (captured graphs are reused across replies)


def cache_size(positions: int) -> int:
    """The capacity a cache for ``positions`` gets."""
    return round_up(max(1, positions), _GROW)


def supports(model: PreTrainedModel) -> bool:
    """Whether the compact step reproduces this model's forward."""
    config = model.config
    if config.model_type not in SUPPORTED or getattr(config, "use_sliding_window", False):
        return False
    if getattr(config, "sliding_window", None) is not None and config.model_type != "qwen2_moe":
        return False
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    return partial == 1.0 and getattr(config, "attn_logit_softcapping", None) is None


class Linear:
    """One weight (several fused along the output), packed where that pays; its biases kept beside it."""

    def __init__(self, modules: list[nn.Linear]) -> None:
        weights = [m.weight.detach() for m in modules]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        biases = [m.bias for m in modules]
        self.bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        self.device, self.dtype = weight.device, weight.dtype
        packed = packing_pays(weight.device, weight.dtype)
        self.weight: Matrix = pack(weight) if packed else owned(weight)  # kept here only: never a view of the file
        self.splits = [m.out_features for m in modules]
        if packed or len(modules) > 1:  # the originals are no longer read: their mapped file pages can go
            drop_file_pages(weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def to_int8(self) -> None:
        """int8 codes with a scale per row, for the CPU's int8 kernel (``--dense int8``)."""
        assert isinstance(self.weight, torch.Tensor)
        self.weight = Int8Matrix(*int8_rows(self.weight.to_dense() if self.weight.is_mkldnn else self.weight))

    @classmethod
    def int8_copy(cls, weight: torch.Tensor) -> Linear:
        """An int8 copy of a weight that stays in use as it is (an output layer tied to the embedding)."""
        copy = cls.__new__(cls)
        copy.bias, copy.splits, copy.device, copy.dtype = None, [weight.shape[0]], weight.device, weight.dtype
        copy.weight = Int8Matrix(*int8_rows(weight.detach()))
        return copy


@dataclass
class Window:
    """What attention sees for ``rows`` new positions from ``start``: ``queries`` query rows over the cache's
    first ``width`` positions, under ``mask`` (None: everything visible).

    Both are rounded up to ``step`` (extra query rows, masked zeroed keys): see attention_shapes.
    """

    start: int
    rows: int
    queries: int
    width: int
    mask: torch.Tensor | None

    @property
    def end(self) -> int:
        return self.start + self.rows

    @classmethod
    def over(cls, start: int, rows: int, step: int, device: torch.device) -> Window:
        end = start + rows
        queries, width = round_up(rows, step) if rows > 1 else 1, round_up(end, step)
        mask = None
        if width > end or rows > 1:  # causal within the new rows, everything before them visible
            seen = torch.arange(start, start + queries, device=device).clamp(max=end - 1)[:, None]
            mask = torch.arange(width, device=device)[None, :] <= seen
        return cls(start, rows, queries, width, mask)


@dataclass
class KVCache:
    """Keys and values of every layer, [1, kv_heads, capacity, head_dim], filled up to ``length``.

    Rolling back a failed step is setting ``length`` back: later positions are overwritten.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def filled(self, device: torch.device) -> KVCache:
        """A copy of the filled positions alone, on ``device``."""
        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, : self.length].to(device, copy=True)

        return KVCache([cut(t) for t in self.keys], [cut(t) for t in self.values], self.length)

    def copy_into(self, other: KVCache) -> None:
        """``other`` holds this cache's positions (and their count); it must have room for them."""
        for mine, theirs in zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True):
            theirs[:, :, : self.length].copy_(mine[:, :, : self.length])
        other.length = self.length

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions, keeping what is filled."""
        if total <= self.capacity:
            return
        size = cache_size(total)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty((*old.shape[:2], size, old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new


class Norm:
    """A family's RMSNorm (all four compute the same): one fused kernel on CUDA, the module itself elsewhere."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.fused = triton_serves(module.weight.device, module.weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.stride(-1) == 1:
            return fused.rms_norm(x, self.module.weight, self.module.variance_epsilon)
        return self.module(x)

    def after_add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``x + delta``, its norm): one kernel for a decode row on CUDA, the two ops elsewhere."""
        if self.fused and x.shape[0] == 1 and x.is_contiguous() and delta.is_contiguous():
            return fused.add_rms_norm(x, delta, self.module.weight, self.module.variance_epsilon)
        total = x + delta
        return total, self(total)


class _Attention:
    """One layer's attention with fused q/k/v."""

    def __init__(self, attn: Any, config: Any) -> None:  # a family's attention module and config
        self.qkv = Linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = Linear([attn.o_proj])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, nn.Identity())  # their weights now live here only
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norms = (Norm(q_norm), Norm(k_norm)) if q_norm is not None and k_norm is not None else None
        # Qwen3 normalises each head, OLMoE the whole projection
        self.norm_per_head = q_norm is not None and q_norm.weight.shape[0] == self.head_dim
        fast = triton_serves(self.o.device, self.o.dtype) and self.head_dim & (self.head_dim - 1) == 0
        self.rotate = fused.rotate if fast else _rotate
        self.fused_decode = fast  # one kernel for q/k/v, one query's attention reads the filled blocks only
        self.clip = getattr(config, "clip_qkv", None)
        norms = self.qk_norms
        self.decode_norms = torch.cat([n.module.weight for n in norms]) if fast and norms is not None else None
        self.eps = norms[0].module.variance_epsilon if norms is not None else 0.0
        assert norms is None or norms[1].module.variance_epsilon == self.eps  # one kernel norms both

    def _project(self, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [heads, T, D] and k, v [kv_heads, T, D], normed and rotated as the family does."""
        rows = x.shape[0]
        q, k, v = self.qkv(x).split(self.qkv.splits, dim=-1)
        if self.qk_norms is not None and not self.norm_per_head:
            q, k = self.qk_norms[0](q), self.qk_norms[1](k)
        if self.clip is not None:
            q, k, v = (t.clamp(min=-self.clip, max=self.clip) for t in (q, k, v))
        q = q.view(rows, self.heads, self.head_dim)
        k = k.view(rows, self.kv_heads, self.head_dim)
        if self.qk_norms is not None and self.norm_per_head:
            q, k = self.qk_norms[0](q), self.qk_norms[1](k)
        v = v.view(rows, self.kv_heads, self.head_dim).transpose(0, 1)
        return self.rotate(q.transpose(0, 1), cos, sin), self.rotate(k.transpose(0, 1), cos, sin), v

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                rows: int) -> torch.Tensor:
        """The output of q's first ``rows`` rows."""
        out = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o(out[0, :, :rows].transpose(0, 1).reshape(rows, -1))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, window: Window) -> torch.Tensor:
        """``x`` [T, H] at the window's new positions, attending to what the cache holds up to there."""
        q, k, v = self._project(x, cos, sin)
        start, end = window.start, window.end
        k_cache[0, :, start:end] = k
        v_cache[0, :, start:end] = v
        if window.width > end:  # masked, but a garbage NaN would still poison 0 * value
            k_cache[0, :, end:window.width] = 0
            v_cache[0, :, end:window.width] = 0
        if window.queries > window.rows:
            q = F.pad(q, (0, 0, 0, window.queries - window.rows))
        keys, values = k_cache[:, :, : window.width], v_cache[:, :, : window.width]
        return self._attend(q, keys, values, window.mask, window.rows)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One token at ``position`` (a device tensor) over the cache up to it: the fused kernel reads that far,
        attention elsewhere reads the whole cache under ``mask`` (additive: 0 up to it). Shapes never change, so
        a CUDA graph can replay it at every position."""
        if self.fused_decode:
            q = fused.decode_qkv(self.qkv(x), self.decode_norms, self.norm_per_head, self.eps, self.clip, cos, sin,
                                 k_cache, v_cache, position, self.heads)
            return self.o(fused.decode_attention(q, k_cache, v_cache, position, self.scaling))
        q, k, v = self._project(x, cos, sin)
        k_cache.index_copy_(2, position, k[None])
        v_cache.index_copy_(2, position, v[None])
        return self._attend(q, k_cache, v_cache, mask, 1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, as transformers applies it (x: [heads, T, D], cos/sin: [T, D])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _MLP:
    """A gated MLP (dense layers, shared experts) with gate and up in one matmul."""

    def __init__(self, mlp: Any) -> None:  # a family's MLP module
        self.gate_up = Linear([mlp.gate_proj, mlp.up_proj])
        self.down = Linear([mlp.down_proj])
        self.act = mlp.act_fn
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, nn.Identity())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.gate_up.splits, dim=-1)
        return self.down(self.act(gate) * up)


class _SharedExpert:
    """Qwen2-MoE's shared expert, scaled by its sigmoid gate."""

    def __init__(self, block: Any) -> None:
        self.mlp = _MLP(block.shared_expert)
        self.gate = Linear([block.shared_expert_gate])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.mlp(x)


class MoEBlock:
    """The family's router and the committee; Qwen2-MoE's gated shared expert beside them."""

    def __init__(self, block: Any) -> None:  # a family's sparse MoE block, its experts a Committee
        self.router: Any = block.gate
        self.experts: Committee = block.experts
        self.shared = _SharedExpert(block) if getattr(block, "shared_expert", None) is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, weights, index = self.router(x)
        out = self.experts(x, index, weights)
        return out + self.shared(x) if self.shared is not None else out


class Layer:
    def __init__(self, layer: Any, config: Any) -> None:  # a family's decoder layer and config
        self.norm_in = Norm(layer.input_layernorm)
        self.norm_mid = Norm(layer.post_attention_layernorm)
        self.attention = _Attention(layer.self_attn, config)
        block = layer.mlp
        self.mlp: MoEBlock | _MLP = MoEBlock(block) if hasattr(block, "experts") else _MLP(block)


class CompactModel:
    """The model's forward as a loop over compact layers; the model's own modules hold the rest."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        inner: Any = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = Norm(inner.norm)
        config = model.config
        self.layers = [Layer(layer, config) for layer in inner.layers]
        head: Any = model.lm_head
        tied = head.weight is self.embed.weight
        self.head: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda x: F.linear(x, self.embed.weight)) if tied else Linear([head]))
        if not tied:
            model.lm_head = nn.Identity()
        first = self.layers[0].attention
        self.kv_shape = (1, first.kv_heads, 0, first.head_dim)
        self.device, self.dtype = self.embed.weight.device, self.embed.weight.dtype
        self.shape_step = shape_step(self.device, self.dtype)

    def quantize_dense(self) -> None:
        """int8 for every matrix outside the experts, as llama.cpp's Q8_0 quantises them: attention, dense and
        shared-expert MLPs and the output layer (a head tied to the embedding gets its own int8 copy). Routers,
        the shared expert's one-row gate, embeddings and norms stay as they are."""
        if isinstance(self.head, Linear):
            self.head.to_int8()
        else:
            self.head = Linear.int8_copy(self.embed.weight)
        for layer in self.layers:
            mlps = [layer.mlp.shared.mlp] if isinstance(layer.mlp, MoEBlock) and layer.mlp.shared else []
            if isinstance(layer.mlp, _MLP):
                mlps.append(layer.mlp)
            for matrix in (layer.attention.qkv, layer.attention.o, *(m.gate_up for m in mlps),
                           *(m.down for m in mlps)):
                matrix.to_int8()

    def new_cache(self, capacity: int, zeroed: bool = False) -> KVCache:
        """``zeroed`` for a cache read whole under a mask: a masked garbage NaN would still poison 0 * value."""
        shape = (*self.kv_shape[:2], round_up(max(capacity, 1), self.shape_step), self.kv_shape[3])
        make = [(torch.zeros if zeroed else torch.empty)(shape, device=self.device, dtype=self.dtype)
                for _ in range(2 * len(self.layers))]
        return KVCache(make[: len(self.layers)], make[len(self.layers) :])

    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (or [1, vocab] for the last position) for ``ids`` [T] after the cache's tokens."""
        start, rows = cache.length, ids.shape[0]
        cache.reserve(start + rows)
        x = self.embed(ids)
        positions = torch.arange(start, start + rows, device=ids.device)[None]
        cos, sin = (t[0] for t in self.rotary(x[None], positions))
        window = Window.over(start, rows, self.shape_step, ids.device)
        for i, layer in enumerate(self.layers):
            x = x + layer.attention(layer.norm_in(x), cos, sin, cache.keys[i], cache.values[i], window)
            x = x + layer.mlp(layer.norm_mid(x))
        cache.length = start + rows
        if not all_logits:
            x = x[-1:]
        return self.head(self.norm(x))
