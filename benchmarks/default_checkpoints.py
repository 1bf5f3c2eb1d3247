"""Which training checkpoint of the default model to ship: perplexity beside the forty questions.

Every resumed ``distill.py train`` run writes a complete shipped folder. Held-out perplexity keeps falling
from one to the next, but answers to short questions move by a few either way, so the choice is made on
both, in the dtype the app runs (bfloat16) and the report's (float32). Writes
benchmarks/results/default-model-checkpoints.md. CPU, about 2 minutes per folder on 2 cores.
Usage: python -m benchmarks default-checkpoints FOLDER [FOLDER ...]
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from expertswap.engine import Engine
from expertswap.models.default_model import shipped
from expertswap.models.default_model.build import ensure_default_model, shipped_folder
from expertswap.models.default_model.gguf_source import find_gguf, load_tokenizer
from tools.recipe.data import FACTUAL, correct

from .default_model import FACTUAL_TOKENS, moe_reply, table_cell, teacher_reply, training_runs
from .stamp import stamp

RESULTS = Path(__file__).parent / "results"
DTYPES = ("float32", "bfloat16")
SHOWN = 0  # the first-impression question the issue was filed on: its reply is shown per checkpoint


def score(folder: Path, teacher_right: list[bool]) -> dict:
    """The recipe's GPU perplexities, then the forty questions at 100% under ``exact`` in each dtype."""
    _, _, recipe = shipped.load(folder)
    runs = training_runs(recipe)
    row = {"folder": folder, "recipe": recipe, "runs": len(runs), "steps": sum(r["steps"] for r in runs),
           "minutes": sum(r["minutes"] for r in runs), "ppl": recipe["after_shipped"]}
    model = ensure_default_model(shipped_dir=folder)
    for dtype in DTYPES:
        with Engine.load(model, budget="100%", policy="exact", dtype=dtype) as engine:
            replies = [moe_reply(engine, prompt, FACTUAL_TOKENS) for prompt, _ in FACTUAL]
        right = [correct(reply, accepted) for reply, (_, accepted) in zip(replies, FACTUAL, strict=True)]
        row[dtype] = (sum(right), sum(t and m for t, m in zip(teacher_right, right, strict=True)), replies[SHOWN])
    return row


def main(folders: list[Path]) -> Path:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    gguf = find_gguf()
    tokenizer = load_tokenizer(gguf)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                dtype=torch.float32).eval()
    teacher_right = [correct(teacher_reply(teacher, tokenizer, prompt, FACTUAL_TOKENS), accepted)
                     for prompt, accepted in FACTUAL]
    del teacher
    rows = [score(folder, teacher_right) for folder in folders]
    shipped_now = shipped.load(shipped_folder())[2]
    of = sum(teacher_right)
    lines = [
        "# The default model's training checkpoints, side by side",
        "",
        f"{stamp()}. Written by `python -m benchmarks default-checkpoints`.",
        "",
        "Perplexity: the recipe's GPU evaluation of each checkpoint's shipped files (full held-out texts, bf16),",
        (f"as a ratio to the dense teacher. Questions: the {len(FACTUAL)} of `tools/recipe/data.py`, greedy, "
         f"{FACTUAL_TOKENS} new tokens, `exact` at 100%; `matched` counts the teacher's {of} right answers the"),
        f"MoE also gets. The last column is the reply to \"{FACTUAL[SHOWN][0]}\" in bfloat16, as the app gives it.",
        "",
        ("| checkpoint | runs | steps | training min | pydoc ppl | GPL-3 ppl | right / matched, float32 | "
         "right / matched, bfloat16 | shipped | first question, bfloat16 |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        ppl = row["ppl"]
        ratio = {k: ppl[k]["student"] / ppl[k]["teacher"] for k in ("pydoc", "gpl3")}
        cells = [f"{row[d][0]} / {row[d][1]} ({row[d][1] / max(of, 1):.0%})" for d in DTYPES]
        is_shipped = "yes" if row["recipe"] == shipped_now else ""
        lines.append(
            f"| {row['folder'].name} | {row['runs']} | {row['steps']} | {row['minutes']:.1f} | "
            f"{ppl['pydoc']['student']:.2f} (x{ratio['pydoc']:.3f}) | {ppl['gpl3']['student']:.2f} "
            f"(x{ratio['gpl3']:.3f}) | {cells[0]} | {cells[1]} | {is_shipped} | {table_cell(row['bfloat16'][2])} |"
        )
    path = RESULTS / "default-model-checkpoints.md"
    path.write_text("\n".join(lines) + "\n")
    return path
