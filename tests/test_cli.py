"""The CLI contract scripts depend on: flags, JSON keys, exit status 2 with a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from expertswap.engine import DEFAULT_BUDGET, parse_budget

JSON_KEYS = {"text", "token_ids", "budget_bytes", "total_expert_bytes", "resident_expert_bytes", "expert_loads",
             "hits", "misses", "peak_rss_bytes", "tokens_per_s"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "expertswap.cli", *args],
                          capture_output=True, text=True, timeout=300)


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
    assert out["resident_expert_bytes"] <= out["budget_bytes"] == out["total_expert_bytes"] // 2
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
    from expertswap.engine import SamplingSettings

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


def test_skip_policy_flags(tiny_model) -> None:
    run = _cli("generate", "--model", str(tiny_model("mixtral")), "--budget", "50%", "--policy", "skip",
               "--skip-threshold", "0.4", "--prompt", "x", "--max-new-tokens", "4", "--json")
    assert run.returncode == 0, run.stderr
    bad = _cli("generate", "--model", str(tiny_model("mixtral")), "--budget", "50%", "--policy", "cpu",
               "--prompt", "x", "--max-new-tokens", "4", "--json")
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and "needs --device cuda" in bad.stderr
