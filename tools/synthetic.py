"""Random-weight checkpoints of every supported family, for tests and speed benchmarks.

The Hugging Face hub is often out of reach (and always in CI), so tests build small models from
transformers configs, ``save_pretrained`` them, and load them back through the real path. Each
gets a byte-level BPE tokenizer trained offline on Python's own documentation, with a chat template.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<pad>"]


def _family_overrides(num_experts: int, top_k: int, intermediate: int, heads: int) -> dict[str, dict[str, Any]]:
    moe = {"num_experts": num_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": intermediate}
    local = {"num_local_experts": num_experts, "num_experts_per_tok": top_k, "intermediate_size": intermediate}
    return {
        "mixtral": dict(local),
        "phimoe": dict(local),
        "granitemoe": dict(local),
        "gpt_oss": {**local, "layer_types": None, "sliding_window": 16, "max_position_embeddings": 131072},
        "olmoe": {"num_experts": num_experts, "num_experts_per_tok": top_k, "intermediate_size": intermediate},
        "qwen2_moe": {**moe, "shared_expert_intermediate_size": 2 * intermediate, "decoder_sparse_step": 1},
        "qwen3_moe": dict(moe),
        "deepseek_v3": {
            "n_routed_experts": num_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": intermediate,
            "first_k_dense_replace": 1, "n_group": 2, "topk_group": 2, "n_shared_experts": 1,
            "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
            "head_dim": 8, "num_key_value_heads": heads, "norm_topk_prob": True,
        },
        "deepseek_v2": {
            "n_routed_experts": num_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": intermediate,
            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
            "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
            "head_dim": 8, "num_key_value_heads": heads,
        },
    }


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(topics[k] for k in sorted(topics))


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on Python's bundled documentation, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def build_model(
    family: str,
    folder: str | Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 32,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.1,
    seed: int = 0,
) -> Path:
    """Save a random ``family`` MoE with its tokenizer to ``folder`` and return the folder (``kv_heads``: half the
    heads unless given)."""
    folder = Path(folder)
    tokenizer = build_tokenizer(vocab_size)
    overrides = _family_overrides(num_experts, top_k, intermediate, heads)[family]
    common: dict[str, Any] = {"head_dim": hidden // heads, "max_position_embeddings": 1024,
                              "num_key_value_heads": kv_heads or max(1, heads // 2)}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        initializer_range=init_std,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **({"intermediate_size": 2 * intermediate} if "intermediate_size" not in overrides else {}),
        **{**common, **overrides},
    )
    if family == "granitemoe":  # default multipliers shrink logits to near-ties
        config.logits_scaling = 1.0
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FAMILY_NAMES = tuple(_family_overrides(8, 2, 32, 4))
