"""Natively quantised checkpoints (fine-grained FP8, GPT-OSS's MXFP4) read packed: their logits and unpacked
experts equal transformers' own loading of the same folder, and the budget counts their packed bytes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from expertswap.models import fit_report
from expertswap.protocol import ModelFormatError, SamplingSettings, SettingsError, UnsupportedArchitectureError
from tools.synthetic import build_model

IDS = [1, 5, 9, 13, 2, 7, 11, 3]
FP8_FAMILIES = ("qwen3_moe", "deepseek_v3", "qwen2_moe", "olmoe", "mixtral", "phimoe", "deepseek_v2")


def _reference(folder: Path) -> torch.nn.Module:
    """transformers' own loading, unpacking FP8 and MXFP4 as it reads them (what it does by itself on a CPU-only
    machine; asked for here so that a GPU machine computes the same reference)."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    settings = json.loads((folder / "config.json").read_text())["quantization_config"]
    unpack = AutoQuantizationConfig.from_dict({**settings, "dequantize": True})
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=unpack).eval()


@pytest.mark.parametrize("family", [*FP8_FAMILIES, "gpt_oss"])
def test_packed_checkpoints_give_transformers_logits_at_every_budget(packed_model, open_engine, family: str) -> None:
    folder = packed_model(family)
    with torch.no_grad():
        want = _reference(folder)(torch.tensor([IDS])).logits[0]
    for budget in ("100%", "50%"):
        engine = open_engine(folder, budget=budget, swapper=False)
        assert engine.native_format == ("mxfp4" if family == "gpt_oss" else "fp8")
        assert engine.quantize is None
        torch.testing.assert_close(engine.logits(IDS), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_packed_reads_unpack_to_transformers_dequantised_experts(packed_model, open_engine, family: str) -> None:
    folder = packed_model(family)
    reference = _reference(folder)
    engine = open_engine(folder, swapper=False)
    for committee in engine.committees:
        experts = reference.get_submodule(f"model.layers.{committee.layer}.mlp.experts")
        spec = engine.store.layers[committee.layer]
        for expert in (0, spec.num_experts - 1):
            kept = engine.store.kept(committee.layer, expert)  # what host RAM holds: codes and scales
            assert kept is not None
            assert {t.dtype for name, t in kept.items() if name.endswith(".q")} <= {torch.float8_e4m3fn, torch.uint8}
            for name, tensor in spec.unpack(kept).items():
                torch.testing.assert_close(tensor, getattr(experts, name).data[expert], rtol=0, atol=0)


def test_fp8_budget_counts_the_packed_bytes_on_disk(packed_model, open_engine) -> None:
    folder = packed_model("qwen3_moe")
    entries = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    on_disk = sum(t.nbytes for k, t in entries.items() if ".mlp.experts." in k)
    engine = open_engine(folder, budget="100%", swapper=False)
    assert engine.total_expert_bytes == on_disk
    plain = open_engine(build_model("qwen3_moe", folder.parent / "plain", dtype=torch.bfloat16), swapper=False)
    assert engine.total_expert_bytes < 0.6 * plain.total_expert_bytes  # 1 byte a value (+ scales) against bf16's 2
    half = open_engine(folder, budget=engine.total_expert_bytes // 2, swapper=False)
    assert len(list(half.generate(IDS, SamplingSettings(max_new_tokens=6)))) == 6
    assert 0 < half.resident_expert_bytes() <= half.budget_bytes
    report = fit_report(folder)
    assert report.total_expert_bytes == on_disk


def test_gpt_oss_keeps_mxfp4_in_ram_and_unpacks_into_its_slots(packed_model, open_engine) -> None:
    folder = packed_model("gpt_oss")
    engine = open_engine(folder, budget="50%", ram_tier=True, swapper=False)
    ram = engine.store.host_bytes
    assert ram < 0.2 * engine.total_expert_bytes  # 4.25 bits a value (+ biases) against float32's 32 in the slots
    assert engine.resident_expert_bytes() <= engine.budget_bytes
    assert fit_report(folder).total_expert_bytes == engine.total_expert_bytes


def _rewrite(folder: Path, copy: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(folder, copy)
    for file in copy.glob("*.safetensors"):
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return copy


def test_mismatched_scales_are_a_clear_error_at_load(packed_model, tmp_path: Path) -> None:
    key = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"

    def halve(tensors: dict[str, torch.Tensor]) -> None:
        if key in tensors:
            tensors[key] = tensors[key][:, :1].contiguous()

    broken = _rewrite(packed_model("qwen3_moe"), tmp_path / "bad-scales", halve)
    from expertswap.engine import Engine

    with pytest.raises(ModelFormatError, match=r"layer 1 expert 3: fp8 weights down_proj .* do not match") as info:
        Engine.load(broken)
    assert "\n" not in str(info.value)

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        tensors.pop("model.layers.0.mlp.experts.gate_up_proj_scales", None)

    missing = _rewrite(packed_model("gpt_oss"), tmp_path / "no-scales", drop)
    with pytest.raises(ModelFormatError, match="gate_up_proj_scales"):
        Engine.load(missing)


def test_unreadable_formats_and_double_quantisation_are_refused(packed_model, tiny_model, tmp_path: Path) -> None:
    from expertswap.engine import Engine

    with pytest.raises(SettingsError, match="already fp8"):
        Engine.load(packed_model("qwen3_moe"), quantize="nf4")
    gptq = shutil.copytree(tiny_model("qwen3_moe"), tmp_path / "gptq")
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="gptq-quantised checkpoints are not supported"):
        Engine.load(gptq)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}  # no block size: per-tensor scales
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="weight_block_size"):
        Engine.load(gptq)
