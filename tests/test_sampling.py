"""The sampler's OpenAI fields against plain transformers logits: presence and frequency penalties, logit bias,
log-probabilities; and constrained decoding (llguidance): JSON, a schema, a grammar, always parsed."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import torch

from expertswap.engine import Engine
from expertswap.protocol import Constraint, SamplingSettings, SettingsError

MESSAGES = [{"role": "user", "content": "Write something."}]


def _reference_greedy(model, ids: list[int], steps: int, stops: set[int], shape) -> list[int]:
    """Greedy tokens from the reference model's logits, each row shaped by ``shape(logits, reply so far)``."""
    sequence, out = list(ids), []
    with torch.no_grad():
        while len(out) < steps and not (out and out[-1] in stops):
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
            out.append(int(shape(logits, out).argmax()))
            sequence.append(out[-1])
    return out


def test_presence_frequency_penalties_and_logit_bias_pick_as_openai_defines_them(tiny_model, reference) -> None:
    folder = tiny_model("qwen3_moe")
    settings = SamplingSettings(max_new_tokens=20, presence_penalty=1.5, frequency_penalty=0.7,
                                logit_bias=((5, 3.0), (17, -100.0)))
    with Engine.load(folder, budget="50%") as engine:
        ids = engine.encode_chat(MESSAGES)
        shaped = list(engine.generate(ids, settings))
        plain = list(engine.generate(ids, SamplingSettings(max_new_tokens=20)))
        stops = engine.decoder.stop_ids

    def openai(logits: torch.Tensor, reply: list[int]) -> torch.Tensor:
        logits = logits.clone()
        for token, count in Counter(reply).items():  # the reply's tokens only, not the prompt's
            logits[token] -= count * 0.7 + 1.5
        logits[5] += 3.0
        logits[17] -= 100.0
        return logits

    assert shaped == _reference_greedy(reference(folder), ids, 20, stops, openai)
    assert shaped != plain and 17 not in shaped


def test_logprobs_are_the_models_own_before_penalties_and_rivals_are_the_top_k(tiny_model, reference) -> None:
    folder = tiny_model("qwen3_moe")
    settings = SamplingSettings(max_new_tokens=6, logprobs=3, presence_penalty=2.0)

    async def stream(engine: Engine) -> list:
        return [chunk async for chunk in engine.stream_ids(engine.encode_chat(MESSAGES), settings)]

    with Engine.load(folder, budget="100%") as engine:
        ids = engine.encode_chat(MESSAGES)
        chunks = asyncio.run(stream(engine))
    model, sequence = reference(folder), list(ids)
    assert chunks and all(c.logprob is not None for c in chunks)
    with torch.no_grad():
        for chunk in chunks:
            want = torch.log_softmax(model(torch.tensor([sequence])).logits[0, -1].float(), -1)
            assert chunk.logprob.logprob == pytest.approx(float(want[chunk.token_id]), abs=1e-4)
            values, top = want.topk(3)
            assert [i for i, _ in chunk.logprob.top] == top.tolist()
            assert [v for _, v in chunk.logprob.top] == pytest.approx(values.tolist(), abs=1e-4)
            sequence.append(chunk.token_id)


def test_openai_fields_turn_off_the_device_side_greedy_pick() -> None:
    """A step queued ahead picks the raw argmax on the device: any field that changes the pick must stop it."""
    assert SamplingSettings().plain_greedy
    for changed in ({"presence_penalty": 0.5}, {"frequency_penalty": -0.5}, {"logit_bias": ((1, 1.0),)},
                    {"logprobs": 0}, {"constraint": Constraint("json")}, {"repetition_penalty": 1.1},
                    {"temperature": 0.5}):
        assert not SamplingSettings(**changed).plain_greedy, changed


@pytest.mark.parametrize("bad", [{"presence_penalty": 2.5}, {"frequency_penalty": float("nan")},
                                 {"logit_bias": ((3, 101.0),)}, {"logit_bias": ((-1, 1.0),)}, {"logprobs": 21},
                                 {"logprobs": True}])
def test_out_of_range_fields_are_refused_before_a_reply(bad) -> None:
    with pytest.raises(SettingsError):
        SamplingSettings(**bad)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}}}}


def test_a_schema_constrained_reply_always_parses_and_matches_its_schema(tiny_model) -> None:
    """A random-weight model says anything; held to the schema it still writes valid JSON, then ends its turn."""
    import jsonschema

    with Engine.load(tiny_model("qwen3_moe"), budget="50%") as engine:
        ids = engine.encode_chat(MESSAGES)
        constraint = Constraint("json_schema", json.dumps(SCHEMA))
        for seed in range(4):
            out = list(engine.generate(ids, SamplingSettings(max_new_tokens=120, temperature=1.0, seed=seed,
                                                             constraint=constraint)))
            assert out[-1] in engine.decoder.stop_ids, "the grammar ends the reply once the object is whole"
            jsonschema.validate(json.loads(engine.decode(out)), SCHEMA)


def test_a_lark_grammar_allows_only_its_sentences_and_no_grammar_changes_nothing(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="50%") as engine:
        ids = engine.encode_chat(MESSAGES)
        for seed in range(3):
            out = list(engine.generate(ids, SamplingSettings(max_new_tokens=10, temperature=1.0, seed=seed,
                                                             constraint=Constraint("lark", 'start: "yes" | "no"'))))
            assert engine.decode(out) in ("yes", "no")
        greedy = SamplingSettings(max_new_tokens=12)
        assert list(engine.generate(ids, greedy)) == list(engine.generate(ids, greedy))


def test_a_bad_schema_or_grammar_or_bias_is_refused_before_any_token(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="50%") as engine:
        ids = engine.encode_chat(MESSAGES)
        for settings in (SamplingSettings(constraint=Constraint("json_schema", "{not json")),
                         SamplingSettings(constraint=Constraint("lark", "start: (")),
                         SamplingSettings(logit_bias=((engine.vocab_size, 1.0),))):
            with pytest.raises(SettingsError):
                next(engine.generate(ids, settings))
        assert engine.stats().tokens_generated == 0
        assert list(engine.generate(ids, SamplingSettings(max_new_tokens=2)))  # and the engine is free
        with pytest.raises(SettingsError):
            next(engine.generate(ids, SamplingSettings(constraint=Constraint("lark", "start: ("))))
        list(engine.generate(ids, SamplingSettings(max_new_tokens=2)))
        assert engine.last_reply.cached_prompt_tokens == len(ids) - 1  # the refusal kept the conversation's cache
