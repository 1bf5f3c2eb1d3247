"""Render a model's chat template, a stranger's program, with a time limit and one typed error for every failure.

transformers renders templates in Jinja's sandbox, which stops escapes but not a template that
loops (nested ``range`` loops run for hours), recurses or raises. Rendering runs with a trace
function on this thread that only looks at the template's own frames (Jinja compiles a template to
Python code named ``<template>``) and raises once the deadline passes, so the caller's thread, the
server's worker or the CLI, always comes back. Every failure becomes a ``ChatTemplateError``, whose
message is the template's own where it raised one on purpose (Mixtral's refuses ``[user, user]``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from jinja2 import TemplateError

from .errors import ChatTemplateError

TEMPLATE_SECONDS = 2.0  # real templates render in about a millisecond
_TEMPLATE_CODE = "<template>"


class _OutOfTime(Exception):
    pass


def render(tokenizer: Any, messages: Sequence[dict], seconds: float = TEMPLATE_SECONDS) -> str:
    """The conversation as the template writes it, ending with the assistant's turn opened."""
    deadline = time.monotonic() + seconds

    def in_template(_frame: FrameType, _event: str, _arg: object) -> Any:
        if time.monotonic() > deadline:
            raise _OutOfTime
        return in_template

    def on_call(frame: FrameType, _event: str, _arg: object) -> Any:
        return in_template(frame, _event, _arg) if frame.f_code.co_filename == _TEMPLATE_CODE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except _OutOfTime:
        raise ChatTemplateError(f"the model's chat template ran for more than {seconds:g} s and was stopped") \
            from None
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
