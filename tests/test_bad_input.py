"""Every kind of bad input gets its own typed error with a message a user can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertswap.engine import (
    BudgetError,
    BudgetTooSmallError,
    DeviceError,
    Engine,
    ModelFormatError,
    ModelNotFoundError,
    PolicyError,
    UnsupportedArchitectureError,
    format_bytes,
    parse_budget,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        Engine.load(tmp_path / "nowhere")


def test_missing_config(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        Engine.load(folder)


def test_missing_weights(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFormatError, match="safetensors"):
        Engine.load(folder)


def test_truncated_safetensors(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        Engine.load(folder)


def test_garbage_safetensors(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    next(folder.glob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFormatError, match="corrupt"):
        Engine.load(folder)


def test_missing_expert_weights(tiny_model, tmp_path: Path) -> None:
    """A checkpoint whose experts are absent fails at load, naming the layer, not mid-chat."""
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(weights).items() if ".experts.3." not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="layer"):
        Engine.load(folder)


def test_unsupported_dense_llama(tmp_path: Path) -> None:
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as err:
        Engine.load(tmp_path)
    assert "llama" in str(err.value) and "Mixtral" in str(err.value) and "GPT-OSS" in str(err.value)


def test_unsupported_switch_transformers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "switch_transformers",
                                                      "architectures": ["SwitchTransformersForConditionalGeneration"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitectureError, match="switch_transformers"):
        Engine.load(tmp_path)


def test_budget_below_minimum(tiny_model) -> None:
    folder = tiny_model("qwen3_moe")
    minimum = Engine.load(folder).minimum_budget_bytes
    with pytest.raises(BudgetTooSmallError) as err:
        Engine.load(folder, budget=minimum - 1)
    assert err.value.minimum_bytes == minimum
    assert format_bytes(minimum) in str(err.value)


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:banana"])
def test_unknown_device(tiny_model, device: str) -> None:
    with pytest.raises(DeviceError, match="use cpu or cuda"):
        Engine.load(tiny_model("qwen3_moe"), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu(tiny_model) -> None:
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        Engine.load(tiny_model("qwen3_moe"), device="cuda")


def test_unknown_policy(tiny_model) -> None:
    with pytest.raises(PolicyError, match="exact"):
        Engine.load(tiny_model("qwen3_moe"), policy="yolo")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("300MiB", 300 * 2**20), ("1.5GB", 1_500_000_000), ("50%", 500), ("100%", 1000), ("2048", 2048),
     ("1 KiB", 1024), ("0.5gib", 2**29), (4096, 4096)],
)
def test_parse_budget(text: str, expected: int) -> None:
    assert parse_budget(text, total_expert_bytes=1000) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "150%", "-5MiB", ""])
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_budget(text, total_expert_bytes=1000)
