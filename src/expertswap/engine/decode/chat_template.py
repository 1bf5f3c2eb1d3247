"""Render a model's chat template, a stranger's program, within time and memory limits, every failure typed.

transformers renders templates in Jinja's sandbox, which stops escapes but not a template that
loops (nested ``range`` loops run for hours), recurses, raises, or builds a huge value. So:

- Rendering runs with a trace function on this thread that looks only at the template's own frames
  (Jinja compiles a template to Python code named ``<template>``): at each of their lines it checks
  the deadline and the process's resident set, so a loop, or a value doubled line by line, stops.
- One operation can build gigabytes inside a single C call, before any line ends: ``'ab' * 10**9``,
  ``x|center(10**10)``, ``'%9999999999s' % x``, a replace whose every match grows the text.
  transformers' sandbox class is swapped, before any template is compiled, for one that refuses
  such sizes (``BoundedSandbox``).

Every failure becomes a ``ChatTemplateError``, whose message is the template's own where it raised one
on purpose (Mixtral's refuses ``[user, user]``).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import psutil
from jinja2 import TemplateError, TemplateSyntaxError, filters
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils import chat_template_utils

from expertswap.protocol.errors import ChatTemplateError

TEMPLATE_SECONDS = 2.0  # real templates render in about a millisecond
TEMPLATE_BYTES = 1 << 30  # growth of the resident set a render may cause
MAX_SIZE = 1 << 22  # characters or items one template operation may build, and the largest width it may ask
_TEMPLATE_CODE = "<template>"
_WIDE = re.compile(r"\d{8,}")  # a width or precision in a format string that alone exceeds MAX_SIZE's order


def _repeated(left: object, right: object) -> int:
    """The length of ``left * right`` when it repeats a sequence, else 0."""
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
            return len(seq) * times
    return 0


def _check_number(value: object) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
        raise SecurityError(f"the number {value} is too large for a chat template")


def _check_format(spec: object) -> None:
    if isinstance(spec, str) and _WIDE.search(spec):
        raise SecurityError("a format width in the chat template is too large")


def _check_replace(text: object, old: object = None, new: object = None, count: object = None) -> None:
    """``text.replace(old, new)`` may grow ``text`` once per match: refuse a result over ``MAX_SIZE``."""
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)) or len(new) <= len(old):
        return
    matches = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        matches = min(matches, count)
    if len(text) + matches * (len(new) - len(old)) > MAX_SIZE:
        raise SecurityError("a chat template may not build a value this large")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with the operations that build a large value in one call bounded."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("center", "indent", "wordwrap", "format"):
            self.filters[name] = _bounded_filter(filters.FILTERS[name])
        original_replace = filters.FILTERS["replace"]

        @filters.pass_eval_context
        def replace(eval_ctx: Any, text: Any, old: Any, new: Any, count: Any = None) -> Any:
            _check_replace(text, old, new, count)
            return original_replace(eval_ctx, text, old, new, count)

        self.filters["replace"] = replace

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and _repeated(left, right) > MAX_SIZE:
            raise SecurityError("a chat template may not build a value this large")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
            raise SecurityError("a chat template may not raise to so large a power")
        if operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            _check_number(value)
        if getattr(__obj, "__name__", "") == "replace":
            _check_replace(getattr(__obj, "__self__", None), *args[:3])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``'{:>9999999999}'.format``: the sandbox wraps it as it is read, so its format string is checked here."""
        if getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(getattr(value, "__self__", None))
        return super().wrap_str_format(value)


def _bounded_filter(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` refusing a width (or, for ``format``, a format string) too large to build."""
    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            _check_number(value)
            _check_format(value)
        return original(*args, **kwargs)

    if hasattr(original, "jinja_pass_arg"):  # how Jinja knows a filter wants the environment passed
        bounded.jinja_pass_arg = original.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


chat_template_utils.ImmutableSandboxedEnvironment = BoundedSandbox  # type: ignore[misc]  # before any compile


class _OutOfBounds(Exception):
    pass


def render(tokenizer: Any, messages: Sequence[dict], seconds: float = TEMPLATE_SECONDS,
           tools: Sequence[dict] | None = None) -> str:
    """The conversation as the template writes it, ending with the assistant's turn opened."""
    process = psutil.Process()
    deadline, ceiling = time.monotonic() + seconds, process.memory_info().rss + TEMPLATE_BYTES
    previous = sys.gettrace()  # a debugger's or coverage's: it keeps seeing every frame but the template's

    def in_template(_frame: FrameType, _event: str, _arg: object) -> Any:
        if time.monotonic() > deadline:
            raise _OutOfBounds(f"ran for more than {seconds:g} s and was stopped")
        if process.memory_info().rss > ceiling:
            raise _OutOfBounds(f"used more than {TEMPLATE_BYTES >> 20} MiB and was stopped")
        return in_template

    def on_call(frame: FrameType, event: Any, arg: object) -> Any:
        if frame.f_code.co_filename == _TEMPLATE_CODE:
            return in_template(frame, event, arg)
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(on_call)
    try:
        text = tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, tokenize=False,
                                             add_generation_prompt=True)
    except _OutOfBounds as exc:
        raise ChatTemplateError(f"the model's chat template {exc}") from None
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: {exc}".splitlines()[0]) from None
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template refused this conversation: {exc}".splitlines()[0]) \
            from None
    except RecursionError:
        raise ChatTemplateError("the model's chat template recursed without end") from None
    except Exception as exc:  # a template can fail as any Python error: a bad filter, a type mismatch
        raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}".splitlines()[0]) \
            from None
    finally:
        sys.settrace(previous)
    if not isinstance(text, str):
        raise ChatTemplateError(f"the model's chat template gave {type(text).__name__}, not text")
    return text
