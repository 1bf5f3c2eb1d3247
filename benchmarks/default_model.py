"""The default model's report: perplexity vs the dense teacher, budgets and policies, chat answers, build cost.

Writes benchmarks/results/default-model.md. CPU only, about 20 minutes on 2 cores: perplexity at each
budget is read through ``Engine.score`` (KV cache, 16-token chunks under decode rules) on a fixed
held-out subset; the full held-out numbers come from the recipe's own GPU evaluation, recorded in
the shipped file. Usage: python -m benchmarks.default_model
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from expertswap.engine import Engine
from expertswap.models.default_model import resolve_model, shipped
from expertswap.models.default_model.build import shipped_folder
from expertswap.models.default_model.gguf_source import find_gguf, load_tokenizer
from expertswap.models.default_model.moe_layout import MoeDesign
from expertswap.protocol import SamplingSettings
from tools.recipe.data import EVAL_PROMPTS, FACTUAL, SIDE_BY_SIDE, correct, heldout

from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
PYDOC_TOKENS, GPL_TOKENS = 256, 2048
CONFIGS = [("100%", "exact"), ("50%", "exact"), ("25%", "exact"), ("50%", "substitute"), ("25%", "substitute")]
CHAT_TOKENS, FACTUAL_TOKENS = 60, 48


def subset(tokenizer) -> dict[str, list[list[int]]]:
    """First 256 tokens of each odd pydoc topic, first 2048 tokens of the GPL-3."""
    texts = heldout()
    return {
        "pydoc": [tokenizer(t, add_special_tokens=False)["input_ids"][:PYDOC_TOKENS] for t in texts["pydoc"]],
        "gpl3": [tokenizer(texts["gpl3"][0], add_special_tokens=False)["input_ids"][:GPL_TOKENS]],
    }


def teacher_ppl(model, docs: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in docs:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def engine_ppl(engine: Engine, docs: list[list[int]]) -> float:
    losses = torch.cat([engine.score(ids, chunk=16).nll for ids in docs])
    return math.exp(losses.mean().item())


def build_cost() -> dict:
    """First-launch build in a fresh cache, in a child process: seconds, peak RSS, size on disk."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, EXPERTSWAP_CACHE=cache)
        code = "from expertswap.models.default_model import resolve_model; resolve_model('default')"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        cached = time.perf_counter() - start
    return {"build_s": seconds, "peak_rss": peak, "cache_bytes": size, "cached_launch_s": cached}


def main() -> None:
    torch.manual_seed(0)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    gguf = find_gguf()
    tokenizer = load_tokenizer(gguf)
    docs = subset(tokenizer)
    cost = build_cost()
    print("build", cost, flush=True)
    folder = resolve_model("default")
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                dtype=torch.float32).eval()
    rows = [("dense teacher (SmolLM2-135M-Instruct)", "-", {k: teacher_ppl(teacher, v) for k, v in docs.items()})]
    print(rows[-1], flush=True)
    answers = {"teacher": [teacher_reply(teacher, tokenizer, p, CHAT_TOKENS) for p in EVAL_PROMPTS]}
    facts = {"teacher": [teacher_reply(teacher, tokenizer, p, FACTUAL_TOKENS) for p, _ in FACTUAL]}
    del teacher
    for budget, policy in CONFIGS:
        with Engine.load(folder, budget=budget, policy=policy, dtype="float32") as engine:
            rows.append((f"MoE, {policy}", budget, {k: engine_ppl(engine, v) for k, v in docs.items()}))
            if budget == "100%":
                answers["moe"] = [moe_reply(engine, p, CHAT_TOKENS) for p in EVAL_PROMPTS]
                facts["moe"] = [moe_reply(engine, p, FACTUAL_TOKENS) for p, _ in FACTUAL]
        print(rows[-1], flush=True)
    design, plans, recipe = shipped.load(shipped_folder())
    write_report(rows, answers, facts, cost, recipe, docs, design, plans)


def teacher_reply(teacher, tokenizer, prompt: str, tokens: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=False)
    with torch.inference_mode():
        out = teacher.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
    return str(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))


def moe_reply(engine: Engine, prompt: str, tokens: int) -> str:
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    return engine.decode(list(engine.generate(ids, SamplingSettings(max_new_tokens=tokens))))


def factual_lines(facts: dict[str, list[str]]) -> list[str]:
    """Scores of the forty questions (contains-match) and five of them side by side."""
    right = {who: [correct(reply, accepted) for reply, (_, accepted) in zip(replies, FACTUAL, strict=True)]
             for who, replies in facts.items()}
    both = sum(t and m for t, m in zip(right["teacher"], right["moe"], strict=True))
    share = both / max(sum(right["teacher"]), 1)
    lines = [
        "",
        f"## {len(FACTUAL)} factual and instruction questions, greedy, {FACTUAL_TOKENS} new tokens at most",
        "",
        "Capitals, arithmetic, science, definitions and simple Python (`tools/recipe/data.py`, `FACTUAL`; kept",
        "out of every training prompt), scored by contains-match of an accepted answer as a whole word.",
        "",
        "| | dense teacher | MoE (100% budget, exact) |",
        "| --- | ---: | ---: |",
        f"| correct | {sum(right['teacher'])} / {len(FACTUAL)} | {sum(right['moe'])} / {len(FACTUAL)} |",
        (f"| teacher's correct answers the MoE also gets | | {both} / {sum(right['teacher'])} ({share:.0%}; "
         f"target >= 80%: {'met' if share >= 0.8 else 'not met'}) |"),
        "",
        "| question | dense teacher | MoE (100% budget) |",
        "| --- | --- | --- |",
    ]
    for i in SIDE_BY_SIDE:
        mark = {who: "" if right[who][i] else " ✗" for who in right}
        lines.append(f"| {table_cell(FACTUAL[i][0])} | {table_cell(facts['teacher'][i])}{mark['teacher']} | "
                     f"{table_cell(facts['moe'][i])}{mark['moe']} |")
    return lines


def table_cell(text: str) -> str:
    """Text as one Markdown table cell."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>")


def _share_summary(shares: list[list[float]], top_k: int) -> str:
    busiest = [max(layer) * top_k for layer in shares]  # share of tokens that reach the busiest expert
    idle = [min(layer) * top_k for layer in shares]
    return (f"busiest expert per layer reached by {min(busiest):.0%}-{max(busiest):.0%} of tokens "
            f"(median {sorted(busiest)[len(busiest) // 2]:.0%}); least used {min(idle):.1%}-{max(idle):.0%}")


def training_runs(recipe: dict) -> list[dict]:
    """The training runs behind the shipped file, first to last (each ``--resume`` records the one before)."""
    runs = [recipe]
    while runs[-1].get("resumed_from"):
        runs.append(runs[-1]["resumed_from"])
    return runs[::-1]


def _design_line(design: MoeDesign, plans: dict) -> str:
    intermediate = len(next(iter(plans.values())).order)
    routed = (intermediate - design.shared) // design.num_experts
    active = (design.shared + design.top_k * routed) / intermediate
    first, last = min(plans), max(plans)
    return (f"Design: layers {', '.join(map(str, design.dense_layers))} dense; layers {first}-{last} each cut into one "
            f"shared expert ({design.shared} neurons, always on) and {design.num_experts} routed experts of {routed} "
            f"neurons, top-{design.top_k} ({active:.0%} of each MLP's neurons active per token).")


def _appended(chat: dict) -> str:
    """The answers a later round added (``distill.py answer --append``), e.g. "; then 1,196 drills (...)"."""
    return "".join(f"; then {a['used']:,} {', '.join(a['prompts'])} ({a['samples']} samples at "
                   f"{', '.join(map(str, a['temperatures']))}, up to {a['max_new']} new tokens)"
                   for a in chat.get("appended", []))


def write_report(rows, answers, facts, cost, recipe, docs, design: MoeDesign, plans: dict) -> None:
    full = recipe["after_shipped"]
    runs = training_runs(recipe)
    chat = recipe.get("chat") or {}
    shipped_mib = sum(p.stat().st_size for p in shipped_folder().iterdir()) / 2**20
    lines = [
        "# The default model: SmolLM2-135M-Instruct as a Qwen2-MoE",
        "",
        f"{stamp()}. Written by `python -m benchmarks.default_model`.",
        "",
        _design_line(design, plans),
        (f"Distilled on an {recipe['device']} for {sum(r['steps'] for r in runs)} steps of {recipe['batch']} x "
         f"{recipe['seq']} tokens ({sum(r['minutes'] for r in runs):.1f} min of training in {len(runs)} runs, each "
         f"resuming the last), {recipe.get('chat_share', 0.5):.0%} of each batch from "
         f"{recipe['chat_tokens']:,} tokens of the teacher's own answers"
         + (f" ({chat['samples']} samples per prompt at temperatures {', '.join(map(str, chat['temperatures']))} to "
            f"{chat['used']:,} prompts{_appended(chat)})" if chat else "") + ", the rest from the corpus."),
        "",
        "## Perplexity on held-out text (full texts, recipe's GPU evaluation, bf16, 512-token windows)",
        "",
        "| text | tokens | dense teacher | MoE (shipped 4-bit deltas) | ratio | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, label, target in (("pydoc", "pydoc topics, odd", 1.15), ("gpl3", "GNU GPL v3", 1.35)):
        r = full[name]
        ratio = r["student"] / r["teacher"]
        lines.append(f"| {label} | {r['tokens']} | {r['teacher']:.2f} | {r['student']:.2f} | {ratio:.3f} | "
                     f"<= {target}: {'met' if ratio <= target else 'not met'} |")
    before = runs[0]["before"]
    lines += [
        "",
        (f"Before distillation (the training-free cut, same routers' initialisation): {before['pydoc']['student']:.1f} "
        f"(pydoc) and {before['gpl3']['student']:.1f} (GPL)."),
        "",
        "## The budget slider: perplexity through the engine on this CPU (float32)",
        "",
        (f"Subset: the first {PYDOC_TOKENS} tokens of each odd pydoc topic ({sum(len(d) - 1 for d in docs['pydoc'])} "
        f"scored tokens) and the first {GPL_TOKENS} of the GPL-3 ({sum(len(d) - 1 for d in docs['gpl3'])}). "
        "Tokens go through `Engine.score`: the KV cache, 16-token chunks under decode rules, the swapper between"),
        (f"chunks. Budgets are fractions of the routed experts' bytes (25% = {design.top_k} of {design.num_experts} "
         "experts per layer = top-k, the minimum)."),
        "",
        "| model | policy | budget | pydoc | GPL-3 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, budget, ppl in rows:
        model, _, policy = label.partition(", ")
        lines.append(f"| {model} | {policy or '-'} | {budget} | {ppl['pydoc']:.2f} | {ppl['gpl3']:.2f} |")
    lines += [
        "",
        "`exact` gives the same numbers at every budget (misses are loaded); `substitute` never loads while",
        "decoding and routes a miss to the best resident expert: that is the slider's real quality trade-off.",
        "",
        f"## Expert load (held-out text, top-{design.top_k})",
        "",
        f"- pydoc: {_share_summary(full['pydoc']['shares'], design.top_k)}.",
        f"- GPL-3: {_share_summary(full['gpl3']['shares'], design.top_k)}.",
        "",
        (f"Routing stays sparse ({design.top_k} of {design.num_experts} per token) and uneven, which is what gives a "
         "committee something to keep."),
        "",
        "## Five chat prompts, greedy, 60 new tokens at most",
        "",
        "| prompt | dense teacher | MoE (100% budget) |",
        "| --- | --- | --- |",
    ]
    for prompt, t, m in zip(EVAL_PROMPTS, answers["teacher"], answers["moe"], strict=True):
        lines.append(f"| {table_cell(prompt)} | {table_cell(t)} | {table_cell(m)} |")
    lines += factual_lines(facts)
    lines += [
        "",
        "## First launch",
        "",
        "| what | measured | target |",
        "| --- | --- | --- |",
        f"| build from GGUF + shipped file (child process, cold cache) | {cost['build_s']:.1f} s | < 60 s |",
        f"| peak RSS of the build | {cost['peak_rss'] / 2**20:.0f} MiB | |",
        f"| cache on disk (bf16 checkpoint + tokenizer) | {cost['cache_bytes'] / 2**20:.0f} MiB | |",
        f"| later launch: verify hashes, return the folder | {cost['cached_launch_s']:.1f} s | |",
        f"| shipped files in the package | {shipped_mib:.1f} MiB | <= 64 MB |",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default-model.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
