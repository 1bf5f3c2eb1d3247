"""Inference engine: a resident committee of MoE experts under a byte budget. Never imports Qt."""

from .budget import format_bytes, parse_budget
from .decoder import TokenChunk, TokenScores
from .engine import Engine, EngineStats, default_device, resolve_device
from .errors import (
    BudgetError,
    BudgetTooSmallError,
    CacheError,
    DeviceError,
    EngineBusyError,
    ExpertSwapError,
    ModelFormatError,
    ModelNotFoundError,
    OutOfMemoryError,
    PolicyError,
    PromptError,
    SettingsError,
    UnsupportedArchitectureError,
)
from .families import FAMILIES, supported_names
from .generation import SamplingSettings

__all__ = [
    "FAMILIES", "BudgetError", "BudgetTooSmallError", "CacheError", "DeviceError", "Engine", "EngineBusyError",
    "EngineStats",
    "ExpertSwapError", "ModelFormatError", "ModelNotFoundError", "OutOfMemoryError", "PolicyError", "PromptError",
    "SamplingSettings", "SettingsError", "TokenChunk", "TokenScores", "UnsupportedArchitectureError", "default_device",
    "format_bytes", "parse_budget", "resolve_device", "supported_names",
]
