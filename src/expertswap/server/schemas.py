"""What a request body may hold: pydantic checks it before a route runs, so a bad field is a 400 that names it.

Every OpenAI field the server implements is here. A field it does not implement is refused by name (``extra =
"forbid"``), never silently ignored, except the spec's bookkeeping (``user``, ``store``, ``metadata``,
``parallel_tool_calls``, ``service_tier``), which is accepted and does nothing here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_STOPS = 4  # stop sequences per request, as OpenAI takes
SEED = 2**63  # seeds are 64-bit signed integers, as OpenAI's
MAX_CHOICES = 4  # ``n``: choices per request; each is a reply of its own, one after another
MAX_PROMPTS = 16  # completions: prompts x n per request (each a reply, all in one turn of the engine)
MAX_BIASES = 1024  # logit_bias entries


class Strict(BaseModel):
    """A part of a request: a field this server does not know is a 400 that names it."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    """Parsed to be refused with words: the models served here read text only."""

    type: Literal["image_url", "input_audio", "file"]
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    """One turn of the conversation; ``developer`` is the system turn under its newer name."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an assistant turn as the server sent it back
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Message:
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        """The content as one text; an image or audio part is refused (``UnsupportedPart``)."""
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        pieces = []
        for part in self.content:
            if isinstance(part, ImagePart):
                raise UnsupportedPart(part.type)
            pieces.append(part.text if isinstance(part, TextPart) else part.refusal)
        return "".join(pieces)


class UnsupportedPart(ValueError):
    """A content part of a kind the model cannot read (an image, audio, a file)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"this model reads text only: content parts of type {kind!r} are not supported")


class FunctionSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format json_schema needs its json_schema")
        return self


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: nothing to pad here


def _listed(stop: object) -> object:
    """OpenAI takes one stop string or a list of them: one is a list of one."""
    return [stop] if isinstance(stop, str) else stop


Stops = Annotated[list[str] | None, BeforeValidator(_listed), Field(max_length=MAX_STOPS)]
Bias = Annotated[dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100, le=100)]],
                 Field(max_length=MAX_BIASES)]


class Sampling(Strict):
    """What chat and plain completions share: the model asked for, streaming, how to sample and how many."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Stops = None
    seed: int | None = Field(None, ge=-SEED, lt=SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Bias | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # vLLM's and llama.cpp's extension (1: none)
    top_k: int = Field(0, ge=0)  # vLLM's and llama.cpp's extension (0: all tokens)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """A field sent as null is the field left out: OpenAI's spec marks them nullable, and clients send them."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _options_need_a_stream(self) -> Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if named is not None and named not in {t.function.name for t in self.tools or []}:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
        if self.tool_choice in ("required",) and not self.tools:
            raise ValueError("tool_choice required needs tools")
        return self


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's: the top alternatives per token
    echo: Literal[False] = False  # echoing the prompt back is not implemented: asked for, it is refused
    suffix: None = None  # nor is insertion
    best_of: Literal[1] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> CompletionRequest:
        if not self.prompt or any(not p for p in self.prompt if isinstance(p, (str, list))):
            raise ValueError("the prompt is empty")
        if len(self.prompts()) * self.n > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} replies a request: prompts times n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One prompt per choice group: text, or token ids (a list of ints is one prompt of ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class BudgetRequest(Strict):
    budget: str


class PolicyRequest(Strict):
    policy: str
    skip_threshold: float = Field(0.0, ge=0.0, lt=1.0)
