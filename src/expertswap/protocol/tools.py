"""Tool calls in a chat: how a request's tools reach the model, and how the model's calls are read back.

One format for every model: a call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes
format, which Qwen2.5, Qwen3 and many others were trained on). A chat template that speaks it is given the tools
and the history's calls as the template expects them (``tools=``, ``tool_calls`` with parsed arguments, ``tool``
turns). Any other template is given them as text: a system turn that lists the tools and shows the format, earlier
calls written out in it, and tool results as user turns. A reply that must call a tool is held to the format by a
grammar (``call_grammar``), so its call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 4  # calls one reply may make when it must call and the request allows parallel calls (else one)
COMPACT = {"whitespace_flexible": False}  # JSON as json.dumps writes it: no run of spaces the model can loop in


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    @staticmethod
    def new_id() -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


def speaks_tools(template: str | None) -> bool:
    """The chat template renders tools and calls itself, in this module's format."""
    return bool(template) and "tools" in template and OPEN in template  # type: ignore[operator]


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system text that offers ``tools`` (OpenAI's ``function`` objects) to a template without tools."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to answer. Their signatures are within <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n"
            f'To call a function, answer with only {OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
            f"{CLOSE}, one such block per call.")


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        parsed = arguments  # a client's malformed arguments are shown to the model as they came
    return OPEN + json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False) + CLOSE


def for_template(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                 native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation and tools as the chat template gets them: as they are for a ``native`` template (the
    calls' arguments parsed, as Hugging Face templates expect), else folded into plain turns."""
    if native:
        out = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [{"type": "function", "id": c["id"], "function": {
                    "name": c["name"], "arguments": _parsed(c["arguments"])}} for c in message["tool_calls"]]
            out.append(message)
        return out, [{"type": "function", "function": dict(t)} for t in tools] if tools else None
    folded: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if message.get("tool_calls"):
            calls = "\n".join(call_text(c["name"], c["arguments"]) for c in message["tool_calls"])
            folded.append({"role": "assistant", "content": "\n".join(filter(None, [content, calls]))})
        elif role == "tool":
            folded.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            folded.append({"role": role, "content": content})
    if tools:
        offer = tools_prompt(tools)
        if folded and folded[0]["role"] == "system":
            folded[0] = {"role": "system", "content": folded[0]["content"] + "\n\n" + offer}
        else:
            folded.insert(0, {"role": "system", "content": offer})
    return folded, None


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_grammar(tools: Sequence[dict[str, Any]], only: str | None = None, most: int = 1) -> str:
    """A Lark grammar (llguidance's dialect) whose sentences are one to ``most`` calls of ``tools`` (of ``only``,
    when named), each with arguments matching its function's parameters. Bounded, so that a model that would
    call on and on still ends its turn; and an object's properties are the ones its schema names unless it says
    otherwise (``additionalProperties``), as OpenAI's calls are, so that a call is what the function takes.

    Each function has a rule of its own (``%json`` of its call), its parameters under ``arguments`` with their
    local references (``$ref: "#/$defs/..."``, ``"#"``) moved there with them."""
    chosen = [t for t in tools if only is None or t["name"] == only]
    bodies = []
    for n, tool in enumerate(chosen):
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        shape = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                 "properties": {"name": {"const": tool["name"]},
                                "arguments": _rebased(_closed(parameters), "#/properties/arguments")},
                 "x-guidance": COMPACT}
        bodies.append(f"body{n}: %json {json.dumps(shape)}")
    calls = " | ".join(" \"\\n\" ".join(["call"] * k) for k in range(1, most + 1))
    choices = " | ".join(f"body{n}" for n in range(len(bodies)))
    return f"start: {calls}\ncall: {json.dumps(OPEN)} ({choices}) {json.dumps(CLOSE)}\n" + "\n".join(bodies) + "\n"


SUBSCHEMAS = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # alternatives each closed; allOf's parts are not (see _closed)
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def _closed(schema: Any) -> Any:
    """``schema`` with every object that lists its properties and says nothing of others closed to others. Only
    schema positions are visited: a literal (``const``, ``enum``, ``default``) stays as written, and ``allOf``'s
    parts stay open, since each closed would refuse the others' properties."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in SUBSCHEMAS:
        if isinstance(closed.get(key), dict):
            closed[key] = _closed(closed[key])
    for key in SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [_closed(item) for item in closed[key]]
    for key in SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: _closed(sub) for name, sub in closed[key].items()}
    if "properties" in closed and "additionalProperties" not in closed and "allOf" not in closed:
        closed["additionalProperties"] = False
    return closed


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` moved under ``root``: every local ``$ref`` (``#...``) points where its target went."""
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: (root + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
                  else _rebased(value, root)) for key, value in schema.items()}


class CallReader:
    """Reads a reply as it streams: the text outside calls passes on (less what may be the start of a call, held
    back until it is known), each complete call comes out parsed."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> str:
        """The text that is surely not part of a call, after ``text`` arrived; complete calls join ``calls``."""
        self.buffer += text
        out = []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = _partial_tag(self.buffer)
                out.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return "".join(out)
            out.append(self.buffer[:start])
            end = self.buffer.find(CLOSE, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                return "".join(out)
            body = self.buffer[start + len(OPEN) : end]
            call = parse_call(body)
            if call is None:  # not a call after all: it stays text
                out.append(self.buffer[: end + len(CLOSE)][start:])
            else:
                self.calls.append(call)
            self.buffer = self.buffer[end + len(CLOSE) :]

    def finish(self) -> str:
        """The text still held at the end (an unfinished call stays text)."""
        rest, self.buffer = self.buffer, ""
        return rest


def calls_shown(text: str) -> str:
    """``text`` with each complete call as Markdown a person reads: the function's name, its arguments as a JSON
    block (what the app shows of a reply that called a tool)."""

    def shown(match: re.Match[str]) -> str:
        call = parse_call(match.group(1))
        if call is None:
            return match.group(0)
        arguments = json.dumps(json.loads(call.arguments), indent=2, ensure_ascii=False) if call.arguments else "{}"
        return f"\n\n**Tool call:** `{call.name}`\n\n```json\n{arguments}\n```\n\n"

    return _CALL.sub(shown, text)


_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def _partial_tag(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``OPEN``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def parse_call(body: str) -> ToolCall | None:
    """The call written between the tags, or None when it is not one: not JSON, no name, or arguments that are
    not an object (nor a JSON text of one), which no client could pass to its function."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _parsed(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False), ToolCall.new_id())
