"""Typed errors: every failure a user can cause has its own class and a one-line message."""

from __future__ import annotations

from expertswap.protocol.units import format_bytes


class ExpertSwapError(Exception):
    """Base of every error the engine raises on purpose; the message is meant for the user."""


class ModelNotFoundError(ExpertSwapError):
    """The model folder (or a file it must hold) does not exist."""


class ModelFormatError(ExpertSwapError):
    """The model folder exists but its config or weights are missing, corrupt or truncated."""


class UnsupportedArchitectureError(ExpertSwapError):
    """The checkpoint is not one of the MoE families the engine knows how to swap, or is packed in a format it
    cannot read (GPTQ, AWQ and the like)."""


class BudgetError(ExpertSwapError):
    """A budget could not be parsed, or a request does not fit in it."""


class BudgetTooSmallError(BudgetError):
    """The budget cannot hold what one token needs (top-k experts in every MoE layer)."""

    def __init__(self, budget_bytes: int, minimum_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes
        super().__init__(
            f"budget {format_bytes(budget_bytes)} is below the minimum of {format_bytes(minimum_bytes)} "
            f"({minimum_bytes} bytes: top-k experts in every MoE layer)"
        )


class DeviceError(ExpertSwapError):
    """The requested compute device is unknown or not available on this machine."""


class PolicyError(ExpertSwapError):
    """An unknown miss policy was requested."""


class EngineBusyError(ExpertSwapError):
    """A reply is already being generated; the engine runs one at a time."""


class EngineClosedError(ExpertSwapError):
    """The engine was closed (its memory given back); a new one must be loaded."""


class PromptError(ExpertSwapError):
    """The prompt cannot be answered: empty, not valid text, or longer than the model's context."""


class ChatTemplateError(PromptError):
    """The model's chat template failed on this conversation: it raised, looped, recursed or does not parse."""


class SettingsError(ExpertSwapError):
    """A sampling setting is out of range (temperature, top-p, token count, seed)."""


class OutOfMemoryError(ExpertSwapError):
    """The device ran out of memory even at the smallest budget."""


class CacheError(ExpertSwapError):
    """The per-user cache (where the default model is built) cannot be written or is busy."""
