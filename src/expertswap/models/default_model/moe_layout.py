"""Dense SmolLM2 -> Qwen2-MoE: each MLP's neurons split into a shared expert and routed experts.

A SwiGLU MLP is a sum over its neurons, so cutting the neurons into groups and summing the groups'
outputs gives back the dense MLP. Qwen2-MoE scales routed experts by their softmax weight and the
shared expert by ``sigmoid(gate . x)``; with zero routers those are exactly 1/E and 1/2, so the
down projections are stored times E and times 2 (powers of two: no rounding) and at top-k = E the
MoE equals the dense model. Trained routers and weight deltas (the shipped file) start from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gguf_source import LlamaShape


@dataclass(frozen=True)
class MoeDesign:
    """How the dense MLPs are cut: E routed experts plus one always-on shared expert."""

    num_experts: int = 8
    top_k: int = 2
    shared: int = 512
    dense_layers: tuple[int, ...] = (0, 29)

    def routed(self, shape: LlamaShape) -> int:
        size, rest = divmod(shape.intermediate - self.shared, self.num_experts)
        if rest:
            raise ValueError("the routed neurons must split evenly into experts")
        return size

    def moe_layers(self, shape: LlamaShape) -> list[int]:
        return [i for i in range(shape.layers) if i not in self.dense_layers]


@dataclass
class LayerPlan:
    """What the recipe learns for one MoE layer; zeros and identity give the exact conversion."""

    order: torch.Tensor  # [I] neuron permutation: shared neurons first, then expert 0, 1, ...
    router: torch.Tensor  # [E, H]
    shared_gate: torch.Tensor  # [1, H]
    norm: torch.Tensor | None = None  # post-attention RMSNorm weight, if trained
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # hub key suffix -> added weight


def exact_plan(shape: LlamaShape, design: MoeDesign) -> dict[int, LayerPlan]:
    """Identity order, zero routers: the MoE reproduces the dense model at top-k = E."""
    return {
        layer: LayerPlan(
            order=torch.arange(shape.intermediate),
            router=torch.zeros(design.num_experts, shape.hidden),
            shared_gate=torch.zeros(1, shape.hidden),
        )
        for layer in design.moe_layers(shape)
    }


def qwen2_moe_config(shape: LlamaShape, design: MoeDesign, top_k: int | None = None) -> dict:
    """The config.json of the converted model (attention as in SmolLM2: no q/k/v bias, tied embeddings)."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": shape.rms_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "qkv_bias": False,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": design.routed(shape),
        "shared_expert_intermediate_size": design.shared,
        "num_experts": design.num_experts,
        "num_experts_per_tok": top_k or design.top_k,
        "norm_topk_prob": False,
        "output_router_logits": False,
        "mlp_only_layers": list(design.dense_layers),
        "bos_token_id": shape.bos_token_id,
        "eos_token_id": shape.eos_token_id,
        "pad_token_id": shape.eos_token_id,
        "dtype": "bfloat16",
    }


def _split_layer(
    dense: dict[str, torch.Tensor], layer: int, plan: LayerPlan, design: MoeDesign, routed: int, consume: bool
) -> dict[str, torch.Tensor]:
    src = f"model.layers.{layer}.mlp"
    take = dense.pop if consume else dense.__getitem__
    gate, up, down = (take(f"{src}.{p}_proj.weight") for p in ("gate", "up", "down"))
    order = plan.order
    gate, up, down = gate[order], up[order], down[:, order]
    out: dict[str, torch.Tensor] = {
        f"{src}.gate.weight": plan.router,
        f"{src}.shared_expert_gate.weight": plan.shared_gate,
    }
    s = design.shared
    out[f"{src}.shared_expert.gate_proj.weight"] = gate[:s]
    out[f"{src}.shared_expert.up_proj.weight"] = up[:s]
    out[f"{src}.shared_expert.down_proj.weight"] = down[:, :s] * 2.0
    for expert in range(design.num_experts):
        cut = slice(s + expert * routed, s + (expert + 1) * routed)
        key = f"{src}.experts.{expert}"
        out[f"{key}.gate_proj.weight"] = gate[cut]
        out[f"{key}.up_proj.weight"] = up[cut]
        out[f"{key}.down_proj.weight"] = down[:, cut] * float(design.num_experts)
    for suffix in list(plan.deltas):
        name = f"{src}.{suffix}"
        delta = plan.deltas.pop(suffix) if consume else plan.deltas[suffix]
        out[name] = out[name] + delta.to(out[name].dtype)
    return {k: v.contiguous() for k, v in out.items()}


def convert(
    shape: LlamaShape, dense: dict[str, torch.Tensor], design: MoeDesign, plans: dict[int, LayerPlan],
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """Qwen2-MoE tensors in the hub layout (per-expert keys), from dense Llama tensors and the plans.

    ``consume`` pops each dense MLP and delta once used, so a build never holds two copies of the experts.
    """
    routed = design.routed(shape)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if ".mlp." in name and int(name.split(".")[2]) in plans:
            continue
        out[name] = tensor
    for layer, plan in plans.items():
        out.update(_split_layer(dense, layer, plan, design, routed, consume))
        if plan.norm is not None:
            out[f"model.layers.{layer}.post_attention_layernorm.weight"] = plan.norm
    return out
