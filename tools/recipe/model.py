"""A compact torch forward of the dense teacher and the Qwen2-MoE student, for distillation only.

The student runs every routed expert densely and multiplies each expert's neurons by its routing
weight (zero when not chosen): the same numbers as Qwen2-MoE's sparse forward, one matmul per layer,
and gradients reach the router. Attention, embeddings and the dense layers are shared and frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertswap.models.default_model.gguf_source import LlamaShape
from expertswap.models.default_model.moe_layout import MoeDesign


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalise in float32, scale in the input's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Distiller(nn.Module):
    """Teacher and student in one module: ``forward(ids, student=...)`` returns logits."""

    def __init__(self, shape: LlamaShape, design: MoeDesign, moe_state: dict[str, torch.Tensor],
                 dense_state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.shape, self.design = shape, design
        self.routed = design.routed(shape)
        self.moe_layers = design.moe_layers(shape)
        frozen = {k: v for k, v in dense_state.items() if ".mlp." not in k}
        for name, tensor in frozen.items():
            self.register_buffer(name.replace(".", "__"), tensor.clone(), persistent=False)
        for layer in range(shape.layers):
            for part in ("gate", "up", "down"):
                key = f"model.layers.{layer}.mlp.{part}_proj.weight"
                self.register_buffer(key.replace(".", "__"), dense_state[key].clone(), persistent=False)
        self.gate_w = nn.ParameterDict()
        self.up_w = nn.ParameterDict()
        self.down_w = nn.ParameterDict()
        self.router = nn.ParameterDict()
        self.shared_gate = nn.ParameterDict()
        self.norm = nn.ParameterDict()
        for layer in self.moe_layers:
            src = f"model.layers.{layer}.mlp"
            names = [f"{src}.shared_expert"] + [f"{src}.experts.{e}" for e in range(design.num_experts)]
            key = str(layer)
            self.gate_w[key] = nn.Parameter(torch.cat([moe_state[f"{n}.gate_proj.weight"] for n in names]).clone())
            self.up_w[key] = nn.Parameter(torch.cat([moe_state[f"{n}.up_proj.weight"] for n in names]).clone())
            self.down_w[key] = nn.Parameter(torch.cat([moe_state[f"{n}.down_proj.weight"] for n in names], 1).clone())
            self.router[key] = nn.Parameter(moe_state[f"{src}.gate.weight"].clone())
            self.shared_gate[key] = nn.Parameter(moe_state[f"{src}.shared_expert_gate.weight"].clone())
            self.norm[key] = nn.Parameter(moe_state[f"model.layers.{layer}.post_attention_layernorm.weight"].clone())
        head_dim = shape.hidden // shape.heads
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.router_stats: list[torch.Tensor] = []

    def _b(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def _attention(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = self.shape
        head_dim = s.hidden // s.heads
        p = f"model.layers.{layer}.self_attn"
        batch, seq, _ = x.shape
        q = F.linear(x, self._b(f"{p}.q_proj.weight")).view(batch, seq, s.heads, head_dim).transpose(1, 2)
        k = F.linear(x, self._b(f"{p}.k_proj.weight")).view(batch, seq, s.kv_heads, head_dim).transpose(1, 2)
        v = F.linear(x, self._b(f"{p}.v_proj.weight")).view(batch, seq, s.kv_heads, head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(batch, seq, s.hidden), self._b(f"{p}.o_proj.weight"))

    def _dense_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp"
        gate, up = F.linear(x, self._b(f"{p}.gate_proj.weight")), F.linear(x, self._b(f"{p}.up_proj.weight"))
        return F.linear(F.silu(gate) * up, self._b(f"{p}.down_proj.weight"))

    def routing(self, layer: int, x: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax router probabilities [.., E] and the dense weight matrix (zero where not chosen)."""
        probs = F.softmax(F.linear(x, self.router[str(layer)]).float(), dim=-1)
        values, index = probs.topk(top_k or self.design.top_k, dim=-1)
        return probs, torch.zeros_like(probs).scatter(-1, index, values)

    def _moe(self, layer: int, x: torch.Tensor, top_k: int | None) -> torch.Tensor:
        key = str(layer)
        probs, weights = self.routing(layer, x, top_k)
        self.router_stats.append(torch.stack([(weights > 0).float().mean(dim=(0, 1)), probs.mean(dim=(0, 1))]))
        shared = torch.sigmoid(F.linear(x, self.shared_gate[key]).float())
        scale = torch.cat([shared.expand(*x.shape[:-1], self.design.shared),
                           weights.repeat_interleave(self.routed, dim=-1)], dim=-1).to(x.dtype)
        hidden = F.silu(F.linear(x, self.gate_w[key])) * F.linear(x, self.up_w[key]) * scale
        return F.linear(hidden, self.down_w[key])

    def forward(self, ids: torch.Tensor, student: bool, top_k: int | None = None,
                capture: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``capture`` (if given) receives each MoE layer's MLP input."""
        s = self.shape
        self.router_stats = []
        h = F.embedding(ids, self._b("model.embed_tokens.weight"))
        positions = torch.arange(ids.shape[1], device=ids.device).float()
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in range(s.layers):
            h = h + self._attention(
                layer, rms_norm(h, self._b(f"model.layers.{layer}.input_layernorm.weight"), s.rms_eps), cos, sin
            )
            moe = student and layer in self.moe_layers
            norm = self.norm[str(layer)] if moe else self._b(f"model.layers.{layer}.post_attention_layernorm.weight")
            x = rms_norm(h, norm, s.rms_eps)
            if capture is not None and layer in self.moe_layers:
                capture[layer] = x.detach()
            h = h + (self._moe(layer, x, top_k) if moe else self._dense_mlp(layer, x))
        h = rms_norm(h, self._b("model.norm.weight"), s.rms_eps)
        return F.linear(h, self._b("model.embed_tokens.weight"))

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The student's MoE tensors back in the hub layout (float32, on the CPU)."""
        out: dict[str, torch.Tensor] = {}
        d, r = self.design, self.routed
        for layer in self.moe_layers:
            key, src = str(layer), f"model.layers.{layer}.mlp"
            gate, up, down = (t.detach().float().cpu() for t in (self.gate_w[key], self.up_w[key], self.down_w[key]))
            names = [f"{src}.shared_expert"] + [f"{src}.experts.{e}" for e in range(d.num_experts)]
            bounds = [0, d.shared] + [d.shared + (e + 1) * r for e in range(d.num_experts)]
            for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
                out[f"{name}.gate_proj.weight"] = gate[lo:hi].contiguous()
                out[f"{name}.up_proj.weight"] = up[lo:hi].contiguous()
                out[f"{name}.down_proj.weight"] = down[:, lo:hi].contiguous()
            out[f"{src}.gate.weight"] = self.router[key].detach().float().cpu()
            out[f"{src}.shared_expert_gate.weight"] = self.shared_gate[key].detach().float().cpu()
            out[f"model.layers.{layer}.post_attention_layernorm.weight"] = self.norm[key].detach().float().cpu()
        return out
