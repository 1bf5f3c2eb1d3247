"""What a request body may hold: pydantic checks it before a route runs, so a bad field is a 400 that names it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field

MAX_STOPS = 4  # stop sequences per request, as OpenAI takes
SEED = 2**63  # seeds are 64-bit signed integers, as OpenAI's


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


def _listed(stop: object) -> object:
    """OpenAI takes one stop string or a list of them: one is a list of one."""
    return [stop] if isinstance(stop, str) else stop


Stops = Annotated[list[str] | None, BeforeValidator(_listed), Field(max_length=MAX_STOPS)]


class Sampling(BaseModel):
    """What chat and plain completions share: the model asked for, streaming, and how to sample."""

    model: str
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Stops = None
    seed: int | None = Field(None, ge=-SEED, lt=SEED)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # vLLM's and llama.cpp's extension (1: none)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


class BudgetRequest(BaseModel):
    budget: str


class PolicyRequest(BaseModel):
    policy: str
    skip_threshold: float = Field(0.0, ge=0.0, lt=1.0)
