"""What fits where: real MoE models' sizes from their configs alone, as stored and with quantised experts.

``python -m benchmarks fit-real``. Each model is built from its published config on the meta device (no
weights, no download) and every parameter counted: experts as the engine holds them (bf16, int8 or nf4,
``engine/weights/quantize.py``), the rest in bf16, and a 4096-token KV cache. Two machines:

- a 16 GB laptop, CPU only: 12 GiB for the app (the rest for the system and other programs), less the
  runtime floor measured here (395 MiB);
- an 8 GB GPU: its memory for the non-expert weights, the KV cache, the committee and 0.5 GiB of CUDA
  context and scratch; the other experts wait on disk or in RAM.

The budget is what is left for the committee, as a share of that format's expert bytes; a model fits when
that is at least one token's experts (top-k in every MoE layer). For comparison, the size a llama.cpp
Q4_K_M file would have, estimated at its average of 4.85 bits per weight.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from expertswap.engine.weights.quantize import quantized_nbytes

from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
GiB = 2**30
LAPTOP_RAM = 12 * GiB - 395 * 2**20
GPU_VRAM = 8 * GiB - GiB // 2
CONTEXT = 4096
Q4_K_M_BITS = 4.85
CONFIGS = {  # the published configs' sizes (hub config.json of each model)
    "Qwen3-30B-A3B": Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                                    moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936,
                                    num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                    tie_word_embeddings=False),
    "GPT-OSS-20B": GptOssConfig(hidden_size=2880, num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4,
                                intermediate_size=2880, vocab_size=201088, num_attention_heads=64,
                                num_key_value_heads=8, head_dim=64),
    "Mixtral-8x7B": MixtralConfig(hidden_size=4096, num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
                                  intermediate_size=14336, vocab_size=32000, num_attention_heads=32,
                                  num_key_value_heads=8),
    "OLMoE-1B-7B": OlmoeConfig(hidden_size=2048, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                               intermediate_size=1024, vocab_size=50304, num_attention_heads=16,
                               num_key_value_heads=16),
}
FORMATS = (None, "int8", "nf4")
SHIPPED = {"Qwen3-30B-A3B": "fp8", "GPT-OSS-20B": "mxfp4"}  # Qwen/Qwen3-30B-A3B-FP8, openai/gpt-oss-20b
FP8_BLOCK = (128, 128)


def sizes(config: object, quantize: str | None) -> dict[str, float]:
    """Bytes as the engine holds them. GPT-OSS's MXFP4 experts are unpacked into its slots, so the committee
    counts bf16 bytes; ``host`` is what its RAM tier keeps (packed)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = non_expert = minimum = params = host = 0
    top_k = config.num_experts_per_tok  # type: ignore[attr-defined]
    for name, p in model.named_parameters():
        params += p.numel()
        if ".experts." not in name:
            non_expert += p.numel() * 2
            continue
        kind = None if "bias" in name else quantize
        per_expert = quantized_nbytes(tuple(p.shape[1:]), torch.bfloat16, None if kind == "mxfp4" else kind, FP8_BLOCK)
        experts += p.shape[0] * per_expert
        minimum += top_k * per_expert
        host += p.shape[0] * quantized_nbytes(tuple(p.shape[1:]), torch.bfloat16, kind, FP8_BLOCK)
    text = config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads  # type: ignore[attr-defined]
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * CONTEXT * 2  # type: ignore[attr-defined]
    return {"params": params, "experts": experts, "non_expert": non_expert, "minimum": minimum, "kv": kv,
            "host": host}


def budget(room: float, s: dict[str, float]) -> str:
    left = room - s["non_expert"] - s["kv"]
    if left < s["minimum"]:
        return f"no (short by {(s['minimum'] - left) / GiB:.1f} GiB)"
    return f"yes, {min(left / s['experts'], 1.0):.0%} ({min(left, s['experts']) / GiB:.1f} GiB of experts)"


def main() -> Path:
    lines = ["# What fits where: real MoE models, from their configs alone", "", stamp() + ". Written by "
             "`python -m benchmarks fit-real`.", "",
             (f"Laptop: 16 GB, CPU only, {LAPTOP_RAM / GiB:.1f} GiB for the app after the system and the runtime "
             f"floor. GPU: 8 GB, {GPU_VRAM / GiB:.1f} GiB after CUDA context and scratch. KV cache for {CONTEXT} "
             "tokens in bf16; non-expert weights in bf16. Budget: the share of that format's expert bytes the "
             "committee can hold."), "",
             ("| model | params | experts as | expert bytes | non-expert | minimum budget | 16 GB laptop | 8 GB GPU | "
             "Q4_K_M file (est.) |"),
             "| --- | ---: | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for name, config in CONFIGS.items():
        for quantize in FORMATS + ((SHIPPED[name],) if name in SHIPPED else ()):
            s = sizes(config, quantize)
            q4 = s["params"] * Q4_K_M_BITS / 8
            label = quantize or "bf16"
            if name in SHIPPED and quantize == SHIPPED[name]:
                label += " as shipped" + (f" ({s['host'] / GiB:.1f} GiB packed in RAM)" if quantize == "mxfp4" else "")
            lines.append(f"| {name} | {s['params'] / 1e9:.1f}B | {label} | {s['experts'] / GiB:.1f} GiB | "
                         f"{s['non_expert'] / GiB:.2f} GiB | {s['minimum'] / GiB:.2f} GiB | {budget(LAPTOP_RAM, s)} | "
                         f"{budget(GPU_VRAM, s)} | {q4 / GiB:.1f} GiB |")
    lines += ["", ("GPT-OSS's int8 and nf4 rows are sizes only: the engine does not quantise its experts when read "
                   "(it refuses with an error). It reads the MXFP4 checkpoint OpenAI ships: packed in RAM and on "
                   "disk (a miss reads about a quarter of bf16's bytes), unpacked to bf16 in the committee slots, "
                   "so its budget is bf16's. Qwen3-30B-A3B-FP8 keeps its experts packed in the slots too "
                   f"(e4m3 + a float32 scale per {FP8_BLOCK[0]}x{FP8_BLOCK[1]} block).")]
    out = RESULTS / "fit-real-models.md"
    out.write_text("\n".join(lines) + "\n")
    return out
