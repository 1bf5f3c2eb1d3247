"""The MoE families the engine can swap, and where each expert's tensors live on disk.

transformers holds every supported family's experts as one module per layer with fused 3-D
parameters (``gate_up_proj`` [E, ...], ``down_proj`` [E, ...]); checkpoints on disk keep the hub
layout, which differs per family. A layout maps each in-memory parameter to the disk keys whose
per-expert tensors are concatenated (dim 0) to form one expert's slice of that parameter.
A key template without ``{expert}`` names a fused [E, ...] tensor read one expert at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertswap.protocol.errors import UnsupportedArchitectureError

Layout = dict[str, tuple[str, ...]]

_PER_EXPERT_GUD: Layout = {
    "gate_up_proj": ("{prefix}.experts.{expert}.gate_proj.weight", "{prefix}.experts.{expert}.up_proj.weight"),
    "down_proj": ("{prefix}.experts.{expert}.down_proj.weight",),
}
_PER_EXPERT_W123: Layout = {
    "gate_up_proj": ("{prefix}.experts.{expert}.w1.weight", "{prefix}.experts.{expert}.w3.weight"),
    "down_proj": ("{prefix}.experts.{expert}.w2.weight",),
}
_FUSED_IN_MEMORY_NAMES: Layout = {
    "gate_up_proj": ("{prefix}.experts.gate_up_proj",),
    "down_proj": ("{prefix}.experts.down_proj",),
}
_FUSED_GRANITE: Layout = {
    "gate_up_proj": ("{prefix}.input_linear.weight",),
    "down_proj": ("{prefix}.output_linear.weight",),
}
_FUSED_GPT_OSS: Layout = {
    "gate_up_proj": ("{prefix}.experts.gate_up_proj",),
    "gate_up_proj_bias": ("{prefix}.experts.gate_up_proj_bias",),
    "down_proj": ("{prefix}.experts.down_proj",),
    "down_proj_bias": ("{prefix}.experts.down_proj_bias",),
}


@dataclass(frozen=True)
class Family:
    """One supported architecture: its experts class and the disk layouts its checkpoints use."""

    model_type: str
    name: str
    experts_class: str
    disk_prefix: str
    layouts: tuple[Layout, ...]


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", "Mixtral", "MixtralExperts", "model.layers.{layer}.block_sparse_moe",
               (_PER_EXPERT_W123, _FUSED_IN_MEMORY_NAMES)),
        Family("phimoe", "Phi-MoE", "PhimoeExperts", "model.layers.{layer}.block_sparse_moe",
               (_PER_EXPERT_W123, _FUSED_IN_MEMORY_NAMES)),
        Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeExperts", "model.layers.{layer}.mlp",
               (_PER_EXPERT_GUD, _FUSED_IN_MEMORY_NAMES)),
        Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeExperts", "model.layers.{layer}.mlp",
               (_PER_EXPERT_GUD, _FUSED_IN_MEMORY_NAMES)),
        Family("olmoe", "OLMoE", "OlmoeExperts", "model.layers.{layer}.mlp",
               (_PER_EXPERT_GUD, _FUSED_IN_MEMORY_NAMES)),
        Family("deepseek_v2", "DeepSeek-V2", "DeepseekV2Experts", "model.layers.{layer}.mlp",
               (_PER_EXPERT_GUD, _FUSED_IN_MEMORY_NAMES)),
        Family("deepseek_v3", "DeepSeek-V3", "DeepseekV3Experts", "model.layers.{layer}.mlp",
               (_PER_EXPERT_GUD, _FUSED_IN_MEMORY_NAMES)),
        Family("granitemoe", "GraniteMoE", "GraniteMoeExperts", "model.layers.{layer}.block_sparse_moe",
               (_FUSED_GRANITE,)),
        Family("gpt_oss", "GPT-OSS", "GptOssExperts", "model.layers.{layer}.mlp", (_FUSED_GPT_OSS,)),
    )
}


def supported_names() -> str:
    """The supported families as one readable line, for error messages and the README."""
    return ", ".join(f.name for f in FAMILIES.values())


def family_for(model_type: str | None, architectures: list[str] | None = None) -> Family:
    """Look up the family of a config's ``model_type``, or raise a clear error naming what is supported."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        what = model_type or "an unknown model type"
        if architectures:
            what += f" ({', '.join(architectures)})"
        raise UnsupportedArchitectureError(
            f"{what} is not a supported Mixture-of-Experts architecture; supported: {supported_names()}"
        )
    return family
