"""What a grammar costs a token on the CPU: the allowed-token mask of llguidance and of xgrammar, side by side.

    python -m benchmarks grammar-mask --out DIR    (xgrammar: pip install --no-deps xgrammar apache-tvm-ffi)

Each library walks the same valid replies token by token on the built-in model's tokenizer (49,152 tokens): a tool
call under ``call_grammar`` and an object under a JSON schema. Per token it computes the mask of what may come
next, and accepts the token; the time of the mask is what constrained decoding adds to a step. Medians and p99 over
every token of 20 walks, a fresh matcher per walk; the grammar's compile is timed apart.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .stamp import stamp

WALKS = 20
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
REPLY = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "engines", "poetry"]},
                   separators=(",", ":"))
TOOL = {"name": "get_weather", "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}
CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"San Francisco","unit":"celsius"}}</tool_call>'


def _llguidance(tokenizer: Any, source: str, kind: str) -> tuple[Callable[[], Any], Callable[[Any], None],
                                                                   Callable[[Any, int], None]]:
    import llguidance
    import llguidance.hf

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammar = (llguidance.LLMatcher.grammar_from_lark(source) if kind == "lark"
               else llguidance.LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": False}))
    return (lambda: llguidance.LLMatcher(lltok, grammar, log_level=0), lambda m: m.compute_bitmask(),
            lambda m, token: _accepted(m.consume_token(token)))


def _xgrammar(tokenizer: Any, source: str, kind: str) -> tuple[Callable[[], Any], Callable[[Any], None],
                                                                 Callable[[Any, int], None]]:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    compiler = xgrammar.GrammarCompiler(info)
    compiled = (compiler.compile_json_schema(source, any_whitespace=False, separators=(",", ":")) if kind == "json"
                else compiler.compile_grammar(source))
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    return (lambda: xgrammar.GrammarMatcher(compiled), lambda m: m.fill_next_token_bitmask(mask),
            lambda m, token: _accepted(m.accept_token(token)))


def _accepted(ok: bool) -> None:
    if not ok:
        raise RuntimeError("the grammar refused a token of a valid reply: the walk measures nothing")


def _walk(library: Callable[..., Any], tokenizer: Any, source: str, kind: str, reply: str) -> dict[str, float]:
    start = time.perf_counter()
    fresh, masked, accept = library(tokenizer, source, kind)  # the tokenizer's table and the grammar
    compile_s = time.perf_counter() - start
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    times: list[float] = []
    for _ in range(WALKS):
        matcher = fresh()
        for token in ids:
            start = time.perf_counter()
            masked(matcher)
            times.append(time.perf_counter() - start)
            accept(matcher, token)
    times.sort()
    return {"compile_ms": compile_s * 1000, "median_us": statistics.median(times) * 1e6,
            "p99_us": times[int(len(times) * 0.99)] * 1e6, "tokens": len(ids)}


def main(out: Path) -> Path:
    from transformers import AutoTokenizer

    from expertswap.models.default_model import resolve_model
    from expertswap.protocol import call_grammar

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    cases = {"tool call (call_grammar)": ("lark", call_grammar([TOOL]), CALL),
             "JSON schema": ("json", json.dumps(SCHEMA), REPLY)}
    libraries = {"llguidance": _llguidance, "xgrammar": _xgrammar}
    lines = ["# Constrained decoding: the mask's cost per token on the CPU", "",
             (f"{stamp()}. The built-in model's tokenizer ({len(tokenizer)} tokens); {WALKS} walks of a valid reply "
              "per case, a fresh matcher each; time of the next-token mask per token. Written by "
              "`python -m benchmarks grammar-mask`."), "",
             "| case | library | compile ms | mask median µs | mask p99 µs | tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for case, (kind, source, reply) in cases.items():
        for name, library in libraries.items():
            if name == "xgrammar" and kind == "lark":
                row = _walk(library, tokenizer, _as_ebnf(source), "ebnf", reply)
            else:
                row = _walk(library, tokenizer, source, kind, reply)
            lines.append(f"| {case} | {name} | {row['compile_ms']:.1f} | {row['median_us']:.0f} | "
                         f"{row['p99_us']:.0f} | {row['tokens']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grammar-mask-cpu.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _as_ebnf(_lark: str) -> str:
    """The tool-call grammar in xgrammar's EBNF (its Lark reader does not take llguidance's ``%json``)."""
    import xgrammar

    body = xgrammar.Grammar.from_json_schema(json.dumps({
        "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": {"const": TOOL["name"]}, "arguments": {**TOOL["parameters"],
                                                                      "additionalProperties": False}}}),
        any_whitespace=False, separators=(",", ":"))
    return str(body).replace("root ::=", "call ::=", 1) + '\nroot ::= "<tool_call>" call "</tool_call>"\n'
