"""Constrained decoding: a reply that must be JSON, match a schema or a grammar is masked token by token.

llguidance (the library llama.cpp, vLLM and SGLang use) computes, after each token, the set of tokens the
grammar allows next, in about 50 µs for a 128k vocabulary (``benchmarks/results/grammar-mask-cpu.md`` has ours).
The sampler sets every other logit to -inf, so the reply parses whatever the model would have said; once the
grammar is complete only the end of the turn is left. With no constraint nothing here runs, and tokens are
unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from expertswap.protocol.errors import SettingsError
from expertswap.protocol.sampling import Constraint

ANY_JSON_OBJECT = {"type": "object"}  # ``response_format: json_object``: an object, as OpenAI's JSON mode gives


class Grammar:
    """One reply's grammar state: which tokens may come next, advanced by each token picked."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every token the grammar forbids next at -inf."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._check()
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[: allowed.shape[0]] = torch.from_numpy(allowed)
        return logits.masked_fill(~keep.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past the picked token (always an allowed one: the mask saw to it)."""
        self.matcher.consume_token(token)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise SettingsError(f"the output grammar failed: {self.matcher.get_error()}")


class GrammarCompiler:
    """Grammars for one tokenizer: llguidance's view of it is built on first use (about a second) and kept."""

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        self._llg: Any = None

    def compile(self, constraint: Constraint) -> Grammar:
        """A fresh grammar state for one reply; a schema or grammar llguidance refuses is a ``SettingsError``."""
        import llguidance

        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.stop_ids or None)
        source = _source(constraint)
        error = llguidance.LLMatcher.validate_grammar(source, self._llg)
        if error:
            raise SettingsError(f"the {constraint.kind.replace('_', ' ')} cannot be used: {error}".splitlines()[0])
        return Grammar(llguidance.LLMatcher(self._llg, source, log_level=0))


def _source(constraint: Constraint) -> str:
    """The constraint as llguidance's grammar text."""
    import llguidance

    if constraint.kind == "lark":
        return str(llguidance.LLMatcher.grammar_from_lark(constraint.text))
    if constraint.kind == "json":
        schema: Any = ANY_JSON_OBJECT
    else:
        try:
            schema = json.loads(constraint.text)
        except ValueError as exc:
            raise SettingsError(f"the JSON schema is not JSON: {exc}") from None
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False}))
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"the JSON schema cannot be used: {exc}".splitlines()[0]) from None
