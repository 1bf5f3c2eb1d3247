"""The CLI contract scripts depend on: flags, JSON keys, exit status 2 with a one-line error."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertswap.protocol import DEFAULT_BUDGET, parse_budget

JSON_KEYS = {"text", "token_ids", "finish_reason", "budget_bytes", "total_expert_bytes",
             "peak_resident_expert_bytes", "expert_loads", "hits", "misses", "peak_rss_bytes", "tokens_per_s"}


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "expertswap.cli", *args],
                          capture_output=True, text=True, timeout=300, input=stdin)


@pytest.mark.parametrize("gpu", [True, False])
def test_both_command_lines_take_the_same_load_options_and_default_to_the_engines_device(
        gpu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """expertswap-cli once loaded on the CPU where expertswap serve took the GPU."""
    from expertswap.cli import build_parser
    from expertswap.cli.options import add_load_options
    from expertswap.cli.serve import parser as serve_parser
    from expertswap.engine import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    shared = argparse.ArgumentParser()
    add_load_options(shared)
    defaults = vars(shared.parse_args([]))
    assert defaults["device"] == default_device() == ("cuda" if gpu else "cpu")
    generate = vars(build_parser().parse_args(["generate", "--prompt", "x", "--max-new-tokens", "1"]))
    chat = vars(build_parser().parse_args(["chat"]))
    serve = vars(serve_parser().parse_args([]))
    for parsed in (generate, chat, serve):
        assert {k: parsed[k] for k in defaults} == defaults


def test_generate_json_matches_transformers(tiny_model, reference) -> None:
    folder = tiny_model("olmoe")
    run = _cli("generate", "--model", str(folder), "--budget", "50%", "--prompt", "Lists are mutable",
               "--max-new-tokens", "10", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert set(out) == JSON_KEYS
    ref = reference(folder)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("Lists are mutable")["input_ids"]
    expected = ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert out["token_ids"] == expected
    assert 0 < out["peak_resident_expert_bytes"] <= out["budget_bytes"] == out["total_expert_bytes"] // 2
    assert out["hits"] + out["misses"] > 0 and out["expert_loads"] > 0
    assert out["peak_rss_bytes"] > 0 and out["tokens_per_s"] > 0


def test_without_a_budget_a_model_folder_starts_at_the_engines_default(tiny_model) -> None:
    run = _cli("generate", "--model", str(tiny_model("olmoe")), "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["budget_bytes"] == parse_budget(DEFAULT_BUDGET, out["total_expert_bytes"])


def test_generate_chat_uses_template(tiny_model, open_engine) -> None:
    folder = tiny_model("qwen2_moe")
    plain = json.loads(_cli("generate", "--model", str(folder), "--budget", "100%", "--prompt", "hi",
                            "--max-new-tokens", "4", "--json").stdout)
    chat = _cli("generate", "--model", str(folder), "--budget", "100%", "--prompt", "hi", "--chat",
                "--policy", "substitute", "--device", "cpu", "--max-new-tokens", "4", "--json")
    assert chat.returncode == 0, chat.stderr
    engine = open_engine(folder)
    wrapped = engine.encode_chat([{"role": "user", "content": "hi"}])
    assert len(wrapped) > len(engine.encode("hi")), "the template adds role markers"
    tokens = json.loads(chat.stdout)["token_ids"]
    from expertswap.protocol import SamplingSettings

    assert tokens == list(engine.generate(wrapped, SamplingSettings(max_new_tokens=4)))
    assert tokens != plain["token_ids"]


def test_errors_exit_2_with_one_line(tiny_model, tmp_path: Path) -> None:
    cases = [
        ("--model", str(tmp_path / "missing"), "--budget", "50%"),
        ("--model", str(tiny_model("qwen3_moe")), "--budget", "1B"),
        ("--model", str(tiny_model("qwen3_moe")), "--budget", "50%", "--device", "tpu"),
    ]
    for case in cases:
        run = _cli("generate", *case, "--prompt", "x", "--max-new-tokens", "2", "--json")
        assert run.returncode == 2
        assert run.stdout == ""
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert run.stderr.startswith("expertswap-cli: error:")


def test_budget_schedule_and_events(tiny_model, reference, tmp_path: Path) -> None:
    folder = tiny_model("mixtral")
    events_file = tmp_path / "events.jsonl"
    run = _cli("generate", "--model", str(folder), "--budget", "100%", "--prompt", "Lists are mutable",
               "--max-new-tokens", "20", "--json", "--budget-schedule", "0:100%,6:30%,12:80%",
               "--events", str(events_file))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("Lists are mutable")["input_ids"]
    expected = reference(folder).generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    assert out["token_ids"] == expected[0, len(ids):].tolist()
    lines = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert all("type" in e and isinstance(e["t"], float) for e in lines)
    assert [e["t"] for e in lines] == sorted(e["t"] for e in lines)
    applied = [e["new_bytes"] for e in lines if e["type"] == "budget" and e["applied"]]
    total = out["total_expert_bytes"]
    assert applied == [int(total * 0.3), int(total * 0.8)]
    assert sum(e["type"] == "token" for e in lines) == len(out["token_ids"])
    assert {"swap", "residency", "token", "budget"} <= {e["type"] for e in lines}
    assert lines[0]["type"] == "residency" != lines[1]["type"], "the starting committees, written once, first"
    assert sum(e["type"] == "residency" for e in lines) == 1 + len(out["token_ids"]) + len(applied)


def test_skip_policy_flags(tiny_model) -> None:
    run = _cli("generate", "--model", str(tiny_model("mixtral")), "--budget", "50%", "--policy", "skip",
               "--skip-threshold", "0.4", "--prompt", "x", "--max-new-tokens", "4", "--json")
    assert run.returncode == 0, run.stderr
    bad = _cli("generate", "--model", str(tiny_model("mixtral")), "--budget", "50%", "--policy", "cpu",
               "--prompt", "x", "--max-new-tokens", "4", "--json")
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and "needs --device cuda" in bad.stderr


def _words(messages: list[dict[str, str]]) -> list[int]:
    """A stand-in chat template: two marker tokens per message, a word per token, one for the reply's start."""
    return [0] * (sum(len(m["content"].split()) + 2 for m in messages) + 1)


def test_fit_history_drops_whole_oldest_turns_and_keeps_the_system_prompt() -> None:
    from expertswap.engine import fit_history, reply_limit
    from expertswap.protocol import PromptError

    system = {"role": "system", "content": "be brief"}
    said = [{"role": role, "content": f"{role} {n} says this"} for n in range(3) for role in ("user", "assistant")]
    chat = [system, *said[:-1]]  # 4 + 5 x 6 + 1 = 35 tokens, ending on the question of turn 2
    whole = fit_history(chat, _words, context=1024, reserve=256)
    assert (whole.messages, whole.dropped, len(whole.ids)) == (chat, 0, 35)
    cut = fit_history(chat, _words, context=30, reserve=5)  # 25 tokens at most: turn 0 (12 tokens) goes
    assert cut.dropped == 1 and cut.messages == [system, *chat[3:]] and len(cut.ids) == 23
    assert fit_history(chat, _words, context=20, reserve=5).messages == [system, chat[-1]]  # 11 tokens
    assert fit_history(chat, _words, context=None, reserve=5).dropped == 0
    # a question left without its reply (the reply failed) is a turn of its own
    unanswered = fit_history([system, chat[1], *chat[1:]], _words, context=30, reserve=5)
    assert unanswered.dropped == 2 and unanswered.messages == [system, *chat[3:]]
    # too long even alone: every older turn goes and the reply gets what is left, or nothing at all
    alone = fit_history(chat, _words, context=12, reserve=5)
    assert alone.messages == [system, chat[-1]] and alone.dropped == 2
    assert reply_limit(len(alone.ids), 12, 5) == 1 and reply_limit(len(alone.ids), None, 5) == 5
    with pytest.raises(PromptError, match="the prompt has 11 tokens; this model's context holds 11"):
        reply_limit(len(alone.ids), 11, 5)


def test_chat_drops_the_oldest_turns_once_the_history_outgrows_the_context(tiny_model) -> None:
    """Piped long turns: every line is answered, the drops are said on stderr; a line too long alone ends it."""
    lines = [f"question {n}:" + " the" * 150 for n in range(8)] + [" the" * 1100, "never read"]
    run = _cli("chat", "--model", str(tiny_model("qwen3_moe")), "--budget", "100%", "--max-new-tokens", "64",
               "--system", "Be brief.", stdin="\n".join(lines) + "\n")
    assert run.returncode == 2
    assert run.stdout.count("bot> ") == 8  # all eight long questions answered, none after the one too long
    *notes, error = run.stderr.strip().splitlines()
    assert notes and all(re.fullmatch(r"expertswap-cli: dropped the (oldest turn|[2-9] oldest turns) to fit "
                                      r"the 1024-token context", note) for note in notes), notes
    assert re.fullmatch(r"expertswap-cli: error: the prompt has \d+ tokens; this model's context holds 1024", error)


def test_generate_stops_at_the_context(tiny_model) -> None:
    """A 1021-token prompt leaves 3 positions of the 1024: 20 new tokens asked, 3 given, and the reason said."""
    folder = tiny_model("qwen3_moe")
    from transformers import AutoTokenizer

    prompt = " the" * 1021
    assert len(AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]) == 1021
    run = _cli("generate", "--model", str(folder), "--budget", "100%", "--prompt", prompt,
               "--max-new-tokens", "20", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["token_ids"]) == 3 and out["finish_reason"] == "context"
    assert run.stderr.splitlines() == [
        "expertswap-cli: the reply stopped at the 1024-token context after 3 of 20 new tokens"]
    full = _cli("generate", "--model", str(folder), "--budget", "100%", "--prompt", " the" * 1024,
                "--max-new-tokens", "2")
    assert full.returncode == 2 and full.stdout == ""
    error = "expertswap-cli: error: the prompt has 1024 tokens; this model's context holds 1024"
    assert full.stderr.splitlines() == [error]
