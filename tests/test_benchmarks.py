"""The benchmark harness measures what it claims: same tokens from every contender, sane fields."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmarks.contenders import run_expertswap, run_transformers


def test_contenders_agree_on_the_tokens(tiny_model) -> None:
    folder = str(tiny_model("olmoe"))
    full = run_transformers(folder, "100%", 6, "cpu", offload=False)
    offloaded = run_transformers(folder, "50%", 6, "cpu", offload=True)
    exact = run_expertswap(folder, "exact", "50%", 6, "cpu")
    lru = run_expertswap(folder, "exact", "25%", 6, "cpu", lru=True)
    assert full["ids"] == offloaded["ids"] == exact["ids"] == lru["ids"] and len(full["ids"]) == 6
    assert len(exact["times"]) == 6 and all(t > 0 for t in exact["times"])
    assert 0.0 <= exact["hit_rate"] <= 1.0 and exact["bytes_loaded"] >= 0 and exact["peak_rss"] > 0


def test_budget_changes_apply_within_one_token(tiny_model) -> None:
    from benchmarks.budget_latency import one_run

    changes = one_run(tiny_model("qwen3_moe"), "cpu")
    assert [c["budget"] for c in changes] == ["25%", "100%"]
    for change in changes:
        assert change["tokens_until_applied"] <= 1  # in force before the token after the one in flight
        assert change["applied"] >= 0 and change["sized"] < 10  # the committee reached its new size


def test_offload_cap_counts_the_run_dtype(tiny_model) -> None:
    import torch

    from benchmarks.contenders import offload_cap
    from expertswap.models.fit import fit_report

    folder = str(tiny_model("olmoe"))  # saved in float32
    report = fit_report(folder, "50%")
    assert offload_cap(folder, "50%", torch.float32) == report.non_expert_bytes + report.budget_bytes
    assert offload_cap(folder, "50%", torch.bfloat16) == (report.non_expert_bytes + report.budget_bytes) // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swap_copy_measures_the_real_swap_path(tiny_model) -> None:
    from benchmarks.swap_copy import measure

    result = measure("tiny", tiny_model("qwen3_moe"), swaps=8, tokens=8)
    assert result["link_big"] > 0 and result["path"] > 0 and result["path_ms"] > 0


def test_the_factual_questions_are_held_out_and_scored_by_whole_words() -> None:
    from tools.recipe.data import EVAL_PROMPTS, FACTUAL, SIDE_BY_SIDE, chat_prompts, correct, prompt_mix

    prompts = [p for p, _ in FACTUAL]
    assert len(FACTUAL) == 40 and len(set(prompts)) == 40 and all(accepted for _, accepted in FACTUAL)
    assert not set(prompts + list(EVAL_PROMPTS)) & set(chat_prompts())
    assert max(SIDE_BY_SIDE) < 40 and len(SIDE_BY_SIDE) == 5
    drill_words = {w.strip("?.,'").lower() for p in prompt_mix()["drills"] for w in p.split()}
    assert not drill_words & {"france", "japan", "italy", "germany", "spain", "egypt", "canada", "kingdom", "brazil",
                              "mouse", "spider", "hot", "cold", "bees", "nectar", "thermometer", "noun", "synonym"}
    assert correct("The capital of France is Paris.", ("paris",))
    assert correct("7 x 8 = 56", ("56", "fifty-six"))
    assert not correct("It is 456.", ("56",)) and not correct("Use length()", ("len",))
    assert not correct("The capital is Lyon.", ("paris",))


def test_the_factual_report_counts_matches_among_the_teachers_correct_answers() -> None:
    from benchmarks.default_model import factual_lines
    from tools.recipe.data import FACTUAL

    teacher = [accepted[0] for _, accepted in FACTUAL]  # all right
    moe = teacher[:30] + ["no idea"] * 10  # 30 of the teacher's 40
    lines = "\n".join(factual_lines({"teacher": teacher, "moe": moe}))
    assert "| correct | 40 / 40 | 30 / 40 |" in lines and "30 / 40 (75%; target >= 80%: not met)" in lines


def _tiny_trace(path) -> None:
    """Two layers of four experts, top-2: a prompt of three tokens, then four decode tokens."""
    import json

    header = {"format": "expertswap-trace/1", "model": "tiny", "family": "olmoe", "layers": [0, 1], "experts": 4,
              "top_k": 2}
    lines = [json.dumps(header)]
    for position in range(7):
        phase = "prefill" if position < 3 else "decode"
        step = 0 if position < 3 else position - 2
        experts = {"0": [position % 4, (position + 1) % 4], "1": [(position + 2) % 4, (position + 3) % 4]}
        lines.append(json.dumps({"position": position, "phase": phase, "step": step, "experts": experts}))
    path.write_text("\n".join(lines) + "\n")


def test_replay_writes_only_where_it_is_told(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import tempfile
    from pathlib import Path

    from benchmarks.__main__ import main

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    trace = tmp_path / "tiny-olmoe.jsonl"  # named like a committed trace: its results are replay-tiny-olmoe.*
    _tiny_trace(trace)
    out = tmp_path / "out"
    main(["replay", str(trace), "--budgets", "50%", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["replay-tiny-olmoe.md", "replay-tiny-olmoe.png"]
    table = (out / "replay-tiny-olmoe.md").read_text()
    assert "| Belady MIN | 50% |" in table and "| LRU | 50% |" in table
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))  # no --out: a new temporary folder
    (tmp_path / "scratch").mkdir()
    main(["replay", str(trace), "--budgets", "50%"])
    [scratch] = (tmp_path / "scratch").iterdir()
    assert sorted(p.name for p in scratch.iterdir()) == ["replay-tiny-olmoe.md", "replay-tiny-olmoe.png"]
    assert str(scratch) in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before


def test_every_listed_command_has_a_runner() -> None:
    import benchmarks.__main__ as harness

    listed = harness.__doc__.split("Commands:")[1].replace("\n", " ").strip(" .").split(", ")
    assert sorted(harness.RUNS) == sorted(listed)


def _trace_file(path, layers: list[int], experts: int, top_k: int, positions: int, prefill: int) -> None:
    """A made-up trace whose routing no random router would choose: each position cycles through the experts."""
    import json

    header = {"format": "expertswap-trace/1", "model": "made-up", "family": "olmoe", "layers": layers,
              "experts": experts, "top_k": top_k, "tokenizer": None}
    lines = [json.dumps(header)]
    for p in range(positions):
        choice = {str(layer): [(p * 3 + layer + j) % experts for j in range(top_k)] for layer in layers}
        lines.append(json.dumps({"position": p, "phase": "prefill" if p < prefill else "decode",
                                 "step": 0 if p < prefill else p - prefill + 1, "experts": choice}))
    path.write_text("\n".join(lines) + "\n")


def test_a_trace_router_hands_the_committees_the_traces_routing(tiny_model, tmp_path) -> None:
    """The committees see exactly the recorded experts, token after token, and a small budget under that routing
    still gives the full budget's greedy tokens (the miss path, exact)."""
    from benchmarks.trace_routing import install, read_routing
    from expertswap.engine import Engine, read_trace
    from expertswap.protocol import SamplingSettings

    folder = tiny_model("olmoe")
    source = tmp_path / "made-up.jsonl"
    _trace_file(source, [0, 1], experts=8, top_k=2, positions=20, prefill=6)
    routing = read_routing(source)
    assert routing.prompt == 6 and routing.index[0].shape == (20, 2)
    outputs = {}
    for budget in ("100%", "minimum"):
        with Engine.load(folder, budget="100%", swapper=False) as probe:
            floor = probe.minimum_budget_bytes
        with Engine.load(folder, budget=floor if budget == "minimum" else budget, swapper=False) as engine:
            install(engine, routing)
            with engine.record_trace(tmp_path / f"seen-{budget}.jsonl"):
                outputs[budget] = list(engine.generate(list(range(3, 9)), SamplingSettings(max_new_tokens=14)))
            if budget == "minimum":
                assert engine.stats().misses > 0  # the small committee missed, and loaded
        _, seen = read_trace(tmp_path / f"seen-{budget}.jsonl")
        for token in seen:
            for layer in (0, 1):
                assert token.experts[layer] == routing.index[layer][token.position].tolist(), (budget, token.position)
    assert outputs["minimum"] == outputs["100%"]


def test_the_trace_router_replays_the_trace_in_order_and_wraps_round() -> None:
    from benchmarks.trace_routing import TraceRouter

    index = torch.tensor([[0, 1], [2, 3], [4, 5]])
    router = TraceRouter(index, torch.full((3, 2), 0.5), 6, torch.device("cpu"))
    x = torch.zeros(2, 4)
    _, weights, got = router(x)  # a two-token prefill
    assert got.tolist() == [[0, 1], [2, 3]] and weights.tolist() == [[0.5, 0.5]] * 2
    assert int(router.position) == 2
    assert router(x[:1])[2].tolist() == [[4, 5]] and router(x[:1])[2].tolist() == [[0, 1]]  # wraps round


def _fake_llama_tree(root: Path) -> Path:
    """A llama.cpp tree whose converter writes a stub GGUF and whose llama-bench answers in its JSON shape
    (``-ncmoe``, ``-p``, ``-n`` as asked; tok/s from them), and refuses a Q8_0 file as a failed load does."""
    (root / "build" / "bin").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys\nargs = sys.argv\n"
        "open(args[args.index('--outfile') + 1], 'w').write(args[args.index('--outtype') + 1])\n")
    bench = root / "build" / "bin" / "llama-bench"
    bench.write_text(f"""#!{sys.executable}
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
if 'q8_0' in args['-m']:
    sys.exit('main: error: failed to load model ' + repr(args['-m']))
rows = []
for n in map(int, args['-ncmoe'].split(',')):
    rows += [{{'n_cpu_moe': n, 'n_prompt': p, 'n_gen': 0, 'avg_ts': 1000.0 * p / (n + 1)}}
             for p in map(int, args['-p'].split(','))]
    rows.append({{'n_cpu_moe': n, 'n_prompt': 0, 'n_gen': int(args['-n']), 'avg_ts': 100.0 / (n + 1)}})
print(json.dumps(rows))
""")
    bench.chmod(0o755)
    return root


def test_llama_cpp_runs_beside_the_trace_rows_at_the_budgets_expert_bytes(tmp_path) -> None:
    """The llama.cpp section asks llama-bench for the layers each budget leaves out (24 layers: 0/6/12/18),
    sets its decode and prefill beside ours with the ratio, and a load it refuses is a row that says so."""
    from benchmarks.trace_routing import beside_llama_cpp

    tree, folder = _fake_llama_tree(tmp_path / "llama.cpp"), tmp_path / "model"
    folder.mkdir()
    rows = {kind: [{"tok_s": speed, "prefill": {"512": 10_000.0}} for speed in (50.0, 40.0, 30.0, 20.0)]
            for kind in ("trace", "random")}
    lines = beside_llama_cpp(tree, folder, 24, ["100%", "75%", "50%", "25%"], rows, (512,), 3, tmp_path)
    table = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines
             if line.startswith("| ")}
    assert "-ncmoe 0,6,12,18" in lines[2]
    assert table[("llama.cpp BF16", "decode")].endswith("| 100.0 | 14.3 | 7.7 | 5.3 |")
    assert table[("llama.cpp BF16", "prefill 512")].endswith("| 512,000.0 | 73,142.9 | 39,384.6 | 26,947.4 |")
    assert table[("ExpertSwap trace / llama.cpp BF16", "decode")].endswith("| 0.50x | 2.80x | 3.90x | 3.80x |")
    assert any(line.startswith("| llama.cpp Q8_0 | failed: llama-bench model-q8_0.gguf: ") and
               "failed to load model" in line for line in lines)
    assert (tmp_path / "model-bf16.gguf").read_text() == "bf16"  # converted once, beside the folder
    assert "failed to load model" in (tmp_path / "llama-bench-q8_0.log").read_text()


def test_app_speed_times_the_real_window_beside_the_engine_alone(tiny_model, tmp_path) -> None:
    """Both contenders in fresh processes: the window (offscreen) sends a prompt, and the engine times its reply."""
    from benchmarks.app_speed import main

    table = main(tiny_model("olmoe"), ["100%", "50%"], tokens=6, repeats=1, out=tmp_path).read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| 100%", "| 50%"))]
    assert len(rows) == 2
    for row in rows:
        alone, window = float(row[1]), float(row[2])
        assert alone > 0 and window > 0 and row[3].endswith("x |")


def test_chat_turns_times_each_turn_from_the_cache_beside_the_whole_history(tiny_model, tmp_path) -> None:
    """Both contenders in fresh processes; from the second turn on the cached one reads most of its prompt from the
    last turn's cache, the other none of it."""
    from benchmarks.chat_turns import main

    table = main(tiny_model("qwen3_moe"), "50%", turns=3, tokens=4, repeats=1, out=tmp_path).read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert len(rows) == 3 and rows[0][2] == "0"
    for row in rows[1:]:
        prompt, cached = int(row[1]), int(row[2])
        assert prompt // 2 < cached < prompt and float(row[3]) > 0 and float(row[4].rstrip(" |")) > 0


def test_cpu_settings_runs_each_variant_in_its_own_environment(tiny_model, tmp_path, monkeypatch) -> None:
    """The variant's environment reaches the contender's process: one thread is one thread there."""
    from benchmarks import cpu_settings

    monkeypatch.setattr(cpu_settings, "RESULTS", tmp_path)
    monkeypatch.setattr(cpu_settings, "variants", lambda: {"as loaded": {}, "1 thread": {"OMP_NUM_THREADS": "1"}})
    table = cpu_settings.main(str(tiny_model("olmoe")), None, "50%", 4, 1, "settings").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["as loaded"][1] == str(torch.get_num_threads()) and rows["as loaded"][3] == "1.00x"
    assert rows["1 thread"][1] == "1" and float(rows["1 thread"][2]) > 0
    assert all(0 <= float(rows[key][5].strip(" |")) < 4 for key in ("as loaded", "1 thread"))  # cores busy, idle


def test_cpu_settings_offers_one_thread_and_the_engines_own_threads() -> None:
    from benchmarks.cpu_settings import variants

    offered = variants()
    first = next(iter(offered))
    assert first == f"as loaded ({torch.get_num_threads()} threads)" and offered[first] == {}
    assert offered["1 thread"] == {"OMP_NUM_THREADS": "1"}
    assert all(Path(env["LD_PRELOAD"]).exists() for env in offered.values() if "LD_PRELOAD" in env)
