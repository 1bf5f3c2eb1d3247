"""What the engine and its front ends share, with no torch and no Qt: errors, units, events, settings, the wire.

The client and the app's remote side import only this; ``expertswap.engine`` builds on it.
"""

from expertswap.protocol import wire
from expertswap.protocol.budget import (
    DEFAULT_BUDGET,
    DEFAULT_BUDGET_PERCENT,
    DEFAULT_BUDGET_RULE,
    DEFAULT_MODEL,
    DEFAULT_MODEL_BUDGET,
    default_budget,
    parse_budget,
)
from expertswap.protocol.engine_like import Chunk, EngineLike
from expertswap.protocol.errors import (
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
from expertswap.protocol.events import (
    BudgetChange,
    Event,
    MemorySample,
    PackProgress,
    ResidencySnapshot,
    Subscription,
    SwapEvent,
    Telemetry,
    TokenStats,
    event_from_json,
)
from expertswap.protocol.options import DEFAULT_EVICTION, EVICTIONS, POLICIES, QUANTIZATIONS, THRESHOLD_POLICIES
from expertswap.protocol.plan import LayerShape, committee_size, minimum_bytes, plan_capacities
from expertswap.protocol.sampling import CHAT_SAMPLING, Constraint, SamplingSettings
from expertswap.protocol.stats import EngineStats
from expertswap.protocol.tools import (
    MAX_CALLS,
    CallReader,
    ToolCall,
    call_grammar,
    calls_shown,
    for_template,
    speaks_tools,
)
from expertswap.protocol.units import format_bytes

__all__ = [
    "CHAT_SAMPLING",
    "DEFAULT_BUDGET",
    "DEFAULT_BUDGET_PERCENT",
    "DEFAULT_BUDGET_RULE",
    "DEFAULT_EVICTION",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_BUDGET",
    "EVICTIONS",
    "MAX_CALLS",
    "POLICIES",
    "QUANTIZATIONS",
    "THRESHOLD_POLICIES",
    "BudgetChange",
    "BudgetError",
    "BudgetTooSmallError",
    "CacheError",
    "CallReader",
    "ChatTemplateError",
    "Chunk",
    "Constraint",
    "DeviceError",
    "EngineBusyError",
    "EngineClosedError",
    "EngineLike",
    "EngineStats",
    "Event",
    "ExpertSwapError",
    "LayerShape",
    "MemorySample",
    "ModelFormatError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "PackProgress",
    "PolicyError",
    "PromptError",
    "ResidencySnapshot",
    "SamplingSettings",
    "SettingsError",
    "Subscription",
    "SwapEvent",
    "Telemetry",
    "TokenStats",
    "ToolCall",
    "UnsupportedArchitectureError",
    "call_grammar",
    "calls_shown",
    "committee_size",
    "default_budget",
    "event_from_json",
    "for_template",
    "format_bytes",
    "minimum_bytes",
    "parse_budget",
    "plan_capacities",
    "speaks_tools",
    "wire",
]
