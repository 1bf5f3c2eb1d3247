"""Inference engine: a resident committee of MoE experts under a byte budget. Never imports Qt.

Rooms: ``weights/`` (reading a model folder), ``moe/`` (one layer's committee), ``budget/`` (sizing and
filling the committees), ``decode/`` (turning prompts into tokens), ``observe/`` (counts, traces, memory);
``engine.py`` is the facade and ``loader.py`` builds it. What the front ends share with it is
``expertswap.protocol``.
"""

from expertswap.engine.decode.decoder import TokenChunk, TokenScores
from expertswap.engine.decode.generation import IncrementalDecoder
from expertswap.engine.decode.history import FittedHistory, dropped_notice, fit_history, reply_limit
from expertswap.engine.decode.sampler import TokenLogprob
from expertswap.engine.device import default_device, resolve_device
from expertswap.engine.engine import Engine
from expertswap.engine.observe.trace import TraceError, TraceHeader, TraceToken, read_trace
from expertswap.engine.weights.families import FAMILIES, supported_names
from expertswap.engine.weights.host_memory import bound_kernel_caches

bound_kernel_caches()  # on import: before anything, ours or the caller's, runs its first CPU matmul

__all__ = [
    "FAMILIES",
    "Engine",
    "FittedHistory",
    "IncrementalDecoder",
    "TokenChunk",
    "TokenLogprob",
    "TokenScores",
    "TraceError",
    "TraceHeader",
    "TraceToken",
    "default_device",
    "dropped_notice",
    "fit_history",
    "read_trace",
    "reply_limit",
    "resolve_device",
    "supported_names",
]
