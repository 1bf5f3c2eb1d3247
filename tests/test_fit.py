"""Fit reports: sizes from headers alone equal what the engine measures after loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from expertswap.engine import Engine
from expertswap.models.fit import fit_report
from expertswap.protocol import ModelNotFoundError, UnsupportedArchitectureError

from .conftest import ALL_FAMILIES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sizes_match_the_loaded_engine(tiny_model, family: str) -> None:
    report = fit_report(tiny_model(family), "50%", context_tokens=1024)
    with Engine.load(tiny_model(family), "100%") as engine:
        stats = engine.stats()
    assert report.total_expert_bytes == stats.total_expert_bytes
    assert report.minimum_budget_bytes == stats.minimum_budget_bytes
    assert report.budget_bytes == stats.total_expert_bytes // 2
    assert report.non_expert_bytes > 0 and report.kv_cache_bytes > 0
    assert report.fits and report.warning() == ""


def test_plain_warnings(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model("qwen3_moe")
    low = fit_report(folder, 1)
    assert not low.fits and "below this model's minimum" in low.warning()

    class Tiny:
        available = 1024

    monkeypatch.setattr("expertswap.models.fit.psutil.virtual_memory", lambda: Tiny())
    report = fit_report(folder, "100%")
    assert not report.fits and "will not fit" in report.warning() and "free RAM" in report.warning()


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        fit_report(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedArchitectureError):
        fit_report(tmp_path)
