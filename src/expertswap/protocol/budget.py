"""Read a memory budget as a user types it: bytes with units ("300MiB", "1.5GB") or a share of all experts ("50%")."""

from __future__ import annotations

import math
import re

from expertswap.protocol.errors import BudgetError

DEFAULT_BUDGET_PERCENT = 50  # a model's starting budget (the built-in one has its own), as a share of expert bytes
DEFAULT_BUDGET = f"{DEFAULT_BUDGET_PERCENT}%"
DEFAULT_MODEL = "default"  # what names the built-in model (``models.resolve_model`` builds it)
# Under `exact` every budget gives the same tokens, so the built-in model starts at the smallest budget that is
# as fast as any: on its measured curve (benchmarks/results/speed-default-cpu.md) that is all of its experts.
DEFAULT_MODEL_BUDGET = "100%"
DEFAULT_BUDGET_RULE = f"{DEFAULT_MODEL_BUDGET} for the built-in model, else {DEFAULT_BUDGET}"  # for help texts


def default_budget(spec: object) -> str:
    """The budget a model starts at when the user names none: the built-in model's measured choice, else the
    engine's default share for models that may not fit. Here, apart from model management, so that the app's
    entry point reads it without importing torch."""
    return DEFAULT_MODEL_BUDGET if str(spec) == DEFAULT_MODEL else DEFAULT_BUDGET

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


def parse_budget(text: str | int, total_expert_bytes: int) -> int:
    """Return the budget in bytes; a percentage is taken of ``total_expert_bytes``."""
    if isinstance(text, int):
        if text < 0:
            raise BudgetError(f"budget must not be negative, got {text}")
        return text
    match = _PATTERN.match(str(text))
    if not match:
        raise BudgetError(f"cannot read budget {text!r}: use bytes with a unit (300MiB, 1.5GB) or a percentage (50%)")
    value, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(value) or value > 2**62:
        raise BudgetError(f"budget {text!r} is too large")
    if unit == "%":
        if value > 100:
            raise BudgetError(f"budget {text!r} is above 100% of the experts")
        return int(total_expert_bytes * value / 100)
    if unit not in _UNITS:
        raise BudgetError(f"unknown unit {match.group(2)!r} in budget {text!r}: use B, KB, MB, GB, KiB, MiB, GiB or %")
    return int(value * _UNITS[unit])
