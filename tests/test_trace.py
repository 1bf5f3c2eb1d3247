"""Routing traces: recorded from a live run, read back, replayed through the engine's own residency code."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.replay import belady, capacities, engine_replay
from expertswap.cli import main as cli
from expertswap.engine import TraceError, TraceHeader, TraceToken, read_trace
from expertswap.protocol import EVICTIONS, SamplingSettings

PROMPT = "The committee keeps the experts it needs; the rest wait on disk until a token asks for them."


def test_a_recorded_trace_reads_back_with_the_routers_choices(tiny_model, open_engine, tmp_path: Path) -> None:
    engine = open_engine(tiny_model("qwen3_moe"), budget="50%")
    ids = engine.encode(PROMPT)
    with engine.record_trace(tmp_path / "t.jsonl"):
        out = list(engine.generate(ids, SamplingSettings(max_new_tokens=6)))
    header, tokens = read_trace(tmp_path / "t.jsonl")
    assert header.layers == [c.layer for c in engine.committees]
    assert (header.experts, header.top_k, header.family) == (8, 2, "qwen3_moe")
    assert header.expert_bytes == engine.committees[0].spec.expert_bytes
    assert [t.phase for t in tokens] == ["prefill"] * len(ids) + ["decode"] * (len(out) - 1)
    assert [t.position for t in tokens] == list(range(len(ids) + len(out) - 1))
    assert len({t.step for t in tokens if t.phase == "prefill"}) == 1  # the prompt ran as one forward
    last = engine.residency().last_token  # what each layer's router chose for the latest token
    assert {layer: sorted(ids) for layer, ids in tokens[-1].experts.items()} == last
    assert all(abs(sum(w) - 1) < 0.2 or sum(w) < 1 for t in tokens for w in t.weights.values())
    with engine.record_trace(tmp_path / "u.jsonl"):  # a second recording starts from a fresh file
        list(engine.generate(ids[:3], SamplingSettings(max_new_tokens=2)))
    assert len(read_trace(tmp_path / "u.jsonl")[1]) == 3 + 1


def test_the_cli_writes_a_trace(tiny_model, tmp_path: Path, capsys) -> None:
    code = cli(["generate", "--model", str(tiny_model("olmoe")), "--prompt", "hello there", "--max-new-tokens", "4",
                "--budget", "50%", "--trace", str(tmp_path / "cli.jsonl"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    header, tokens = read_trace(tmp_path / "cli.jsonl")
    assert header.family == "olmoe" and tokens[0].phase == "prefill"
    assert sum(t.phase == "decode" for t in tokens) == len(out["token_ids"]) - 1


@pytest.mark.parametrize(("eviction", "swapper"), [("lru", False), ("lfu", False), ("lfu", True)])
def test_replay_gives_the_live_runs_own_hits_and_misses(tiny_model, open_engine, tmp_path: Path,
                                                        eviction: str, swapper: bool) -> None:
    """The replay runs the engine's residency code: same committee sizes, same decisions, same counts; with the
    swapper, by the engine's rule under ``exact`` (it fills empty slots and evicts nothing)."""
    engine = open_engine(tiny_model("qwen3_moe"), budget="50%", eviction=eviction, swapper=swapper)
    with engine.record_trace(tmp_path / "t.jsonl"):
        for prompt in (PROMPT, "A second reply, to another prompt, on the same committee."):
            list(engine.generate(engine.encode(prompt), SamplingSettings(max_new_tokens=24)))
    stats = engine.stats()
    header, tokens = read_trace(tmp_path / "t.jsonl")
    caps = capacities(header, "50%")
    assert caps == [c.capacity for c in engine.committees]
    replayed = engine_replay(header, tokens, caps, eviction, swapper=swapper)
    assert stats.misses > 0 and stats.hits > 0
    assert replayed.hits + replayed.prompt_hits == stats.hits
    assert replayed.misses + replayed.prompt_misses == stats.misses
    assert replayed.loads == stats.expert_loads


def _random_trace(rng: random.Random, experts: int, top_k: int, layers: int, length: int) -> list[TraceToken]:
    """Decode tokens whose experts drift: each layer mostly reuses a small, slowly changing favourite set."""
    favourites = [rng.sample(range(experts), top_k + 2) for _ in range(layers)]
    tokens = []
    for position in range(length):
        chosen = {}
        for layer in range(layers):
            if rng.random() < 0.1:
                favourites[layer][rng.randrange(len(favourites[layer]))] = rng.randrange(experts)
            pool = list(dict.fromkeys(favourites[layer])) if rng.random() < 0.8 else list(range(experts))
            chosen[layer] = rng.sample(pool, top_k) if len(pool) >= top_k else rng.sample(range(experts), top_k)
        tokens.append(TraceToken(position, "decode", position, chosen, {}))
    return tokens


@pytest.mark.slow  # a subprocess or a long replay: make test runs it, make test-fast does not
def test_no_demand_policy_beats_belady_on_random_traces() -> None:
    rng = random.Random(7)
    for _ in range(40):
        experts, top_k, layers = rng.choice([8, 16]), rng.choice([1, 2, 4]), 2
        header = TraceHeader("random", "none", list(range(layers)), experts, top_k)
        tokens = _random_trace(rng, experts, top_k, layers, rng.randrange(20, 120))
        caps = [rng.randrange(top_k, experts + 1) for _ in range(layers)]
        best = belady(header, tokens, caps)
        for eviction in EVICTIONS:
            demand = engine_replay(header, tokens, caps, eviction)
            assert demand.misses >= best.misses, (eviction, caps, demand.misses, best.misses)
            assert demand.loads >= best.loads


@pytest.mark.parametrize(("line", "words"), [
    ("not json", "not JSON"),
    ('{"position": 0, "phase": "later", "experts": {"0": [1, 2]}}', "phase"),
    ('{"position": 0, "phase": "decode", "experts": {"0": [1, 9]}}', "outside 0..7"),
    ('{"position": 0, "phase": "decode", "experts": {"5": [1, 2]}}', "layers"),
    ('{"phase": "decode", "experts": {"0": [1, 2]}}', "position"),
])
def test_a_bad_trace_line_is_named(tmp_path: Path, line: str, words: str) -> None:
    header = {"format": "expertswap-trace/1", "model": "m", "family": "olmoe", "layers": [0], "experts": 8,
              "top_k": 2}
    good = '{"position": 0, "phase": "prefill", "step": 0, "experts": {"0": [1, 2]}}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(header), good, line]) + "\n")
    with pytest.raises(TraceError, match=rf"bad\.jsonl:3: .*{words}"):
        read_trace(path)


def test_a_file_that_is_not_a_trace_is_named_at_line_1(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "swap"}\n')
    with pytest.raises(TraceError, match=r"events\.jsonl:1: not a trace header"):
        read_trace(path)
