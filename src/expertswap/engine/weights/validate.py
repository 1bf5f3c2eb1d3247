"""Checks on what a model folder claims, made before anything is built from it.

transformers trusts its configs: a string where a count belongs, a negative top-k or a config of
``null`` reach model construction and end in tracebacks, or load silently wrong. Every check here
turns such a folder into a ``ModelFormatError`` that names the field.
"""

from __future__ import annotations

import math
import re

from expertswap.protocol.errors import ModelFormatError

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_POSITIVE = frozenset({
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "num_experts_per_tok",
    *_EXPERT_COUNT_KEYS,
})
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_raw_config(raw: dict, defaults: object) -> None:
    """Each field must have the type of the family's default; counts and sizes must be positive."""
    for key, value in raw.items():
        default = getattr(defaults, key, None)
        if value is None or default is None or isinstance(default, bool) or key.endswith("token_id"):
            continue  # null means "unset"; token ids may be lists
        if isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ModelFormatError(f"config.json: {key} must be a whole number, got {value!r}")
            if key in _POSITIVE and value <= 0:
                raise ModelFormatError(f"config.json: {key} must be positive, got {value}")
        elif isinstance(default, float) and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
                raise ModelFormatError(f"config.json: {key} must be a finite number, got {value!r}")


def _positive_whole(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFormatError(f"config.json: {name} must be a positive whole number, got {value!r}")
    return value


def check_moe_config(config: object) -> tuple[int, int]:
    """(experts per layer, experts per token) of a loaded config, both sane, or a typed error."""
    experts = _positive_whole("number of experts", next(
        (getattr(config, k) for k in _EXPERT_COUNT_KEYS if getattr(config, k, None) is not None), None))
    top_k = _positive_whole("num_experts_per_tok", getattr(config, "num_experts_per_tok", None))
    if top_k > experts:
        raise ModelFormatError(f"config.json: num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})")
    return experts, top_k


def check_layers(keys: list[str], layers: int) -> None:
    """Weights for layers the config does not have mean the config and the weights disagree."""
    found = {int(m.group(1)) for key in keys if (m := _LAYER.search(key))}
    extra = sorted(n for n in found if n >= layers)
    if extra:
        raise ModelFormatError(f"the weights hold layer {extra[0]} but config.json says num_hidden_layers = {layers}")


def check_header_entry(file: str, key: str, info: object, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one safetensors header entry, checked against the file's data size."""
    if not isinstance(info, dict):
        raise ModelFormatError(f"{file}: header entry {key!r} is not an object (corrupt header)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ModelFormatError(f"{file}: tensor {key!r} has no dtype (corrupt header)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ModelFormatError(f"{file}: tensor {key!r} has a bad shape {shape!r} (corrupt header)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ModelFormatError(f"{file}: tensor {key!r} has bad data_offsets {offsets!r} (corrupt header)")
    if offsets[1] > data_bytes:
        raise ModelFormatError(f"{file} is truncated: {key!r} needs {offsets[1]} data bytes, the file has {data_bytes}")
    return dtype, tuple(shape), offsets[0], offsets[1]
