"""Inference engine: a resident committee of MoE experts under a byte budget. Never imports Qt."""

from .budget import DEFAULT_BUDGET, DEFAULT_BUDGET_PERCENT, format_bytes, parse_budget
from .committee import POLICIES
from .decoder import TokenChunk, TokenScores
from .engine import Engine, EngineStats, default_device, resolve_device
from .errors import (
    BudgetError,
    BudgetTooSmallError,
    CacheError,
    ChatTemplateError,
    DeviceError,
    EngineBusyError,
    EngineClosedError,
    ExpertSwapError,
    ModelFormatError,
    ModelNotFoundError,
    OutOfMemoryError,
    PolicyError,
    PromptError,
    SettingsError,
    UnsupportedArchitectureError,
)
from .expert_cache import DEFAULT_EVICTION, EVICTIONS
from .families import FAMILIES, supported_names
from .generation import IncrementalDecoder, SamplingSettings
from .history import FittedHistory, dropped_notice, fit_history, reply_limit
from .host_memory import bound_kernel_caches
from .quantize import QUANTIZATIONS
from .telemetry import (
    BudgetChange,
    MemorySample,
    ResidencySnapshot,
    Subscription,
    SwapEvent,
    Telemetry,
    TokenStats,
    event_from_json,
)
from .trace import TraceError, TraceHeader, TraceToken, read_trace

bound_kernel_caches()  # on import: before anything, ours or the caller's, runs its first CPU matmul

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_BUDGET_PERCENT",
    "DEFAULT_EVICTION",
    "EVICTIONS",
    "FAMILIES",
    "POLICIES", "QUANTIZATIONS",
    "BudgetChange",
    "BudgetError",
    "BudgetTooSmallError",
    "CacheError",
    "ChatTemplateError",
    "DeviceError",
    "Engine",
    "EngineBusyError",
    "EngineClosedError",
    "EngineStats",
    "ExpertSwapError",
    "FittedHistory",
    "IncrementalDecoder",
    "MemorySample",
    "ModelFormatError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "PolicyError",
    "PromptError",
    "ResidencySnapshot",
    "SamplingSettings",
    "SettingsError",
    "Subscription",
    "SwapEvent",
    "Telemetry",
    "TokenChunk",
    "TokenScores",
    "TokenStats",
    "TraceError",
    "TraceHeader",
    "TraceToken",
    "UnsupportedArchitectureError",
    "default_device",
    "dropped_notice",
    "event_from_json",
    "fit_history",
    "format_bytes",
    "parse_budget",
    "read_trace",
    "reply_limit",
    "resolve_device",
    "supported_names",
]
