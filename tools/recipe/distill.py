"""Rebuild the default model's shipped file: split SmolLM2's MLPs into experts and distil on a GPU.

    python -m tools.recipe.data build/recipe          # corpus and prompt mix (CPU, 20 s)
    python -m tools.recipe.distill prepare --gguf G --work build/recipe
    python -m tools.recipe.distill train --gguf G --work build/recipe --minutes 8 --out F
    python -m tools.recipe.distill answer --gguf G --work build/recipe --kinds drills --append   # more answers

G is the teacher's GGUF; F is the shipped folder, ``src/expertswap/models/default_model/files``.

The shipped file came from commands on one H200 over three sessions (the lent GPU's 10-minute command
limit splits training into runs): ``prepare --samples 2 --temperatures 0.3,0.7,1.0 --max-new 256`` (the
teacher's answers took 269 s), ``train --minutes 2.27 --chat-share 0.75 --balance 1e-2``, then five times
``train --resume`` of the last output: ``--minutes 8.2 --lr 1.5e-4``, ``7.9 --lr 1e-4``, ``8.3 --lr 1e-4``,
``8.5 --lr 1e-4`` and ``8.4 --lr 8e-5`` (same chat share and balance). Those runs plateaued on the forty
questions, so the third session added the drills: ``answer --kinds drills --append --samples 2
--temperatures 0.3,0.7,1.0 --max-new 128`` (85 s), then three more resumed runs, ``5.95 --lr 1e-4``,
``8.4 --lr 8e-5`` and ``8.4 --lr 6e-5``; the last one ships. Every run's settings and log are in its
metadata; ``python -m benchmarks default-checkpoints`` compares checkpoints.

``prepare`` has the teacher answer ``data.chat_prompts()`` (sampled, seeded) and cuts every MoE layer
(``--experts``, ``--top-k``, ``--shared``; the defaults are the shipped design): the neurons that matter
most on calibration text form the shared expert; the rest are grouped by co-activation (balanced cosine
k-means) into equal routed experts; each router starts as a least-squares fit of its experts' activation
mass, scaled down so the first outputs stay close to the dense MLP's. ``train`` minimises
KL(teacher || student) on ``--chat-share`` teacher answers and the rest corpus windows, with a light
load-balancing term, then writes routers, order and 4-bit deltas, and prints held-out perplexities and
expert load shares.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expertswap.models.default_model import shipped
from expertswap.models.default_model.gguf_source import LlamaShape, load_tokenizer, read_dense
from expertswap.models.default_model.moe_layout import LayerPlan, MoeDesign, convert, exact_plan

from . import data
from .model import Distiller

SEED = 1234
SEQ = 512


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate_chat(shape: LlamaShape, dense: dict, tokenizer, prompts: list[str], samples: int,
                  max_new: int, batch: int, temperatures: tuple[float, ...] = (0.7,)) -> np.ndarray:
    """Teacher answers to ``prompts`` (``samples`` at each of ``temperatures``, top-p 0.9) as chat-formatted
    token ids: the teacher's own distribution, which is what the student should learn to reproduce."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        rms_norm_eps=shape.rms_eps, max_position_embeddings=shape.context, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        bos_token_id=shape.bos_token_id, eos_token_id=shape.eos_token_id, pad_token_id=shape.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(dense, strict=False)
    model.tie_weights()
    model = model.to(_device(), torch.bfloat16).eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts for _ in range(samples)]
    jobs = [(t, start) for t in temperatures for start in range(0, len(texts), batch)]
    torch.manual_seed(SEED)
    out: list[int] = []
    for done, (temperature, start) in enumerate(jobs, 1):
        enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.9, max_new_tokens=max_new)
        for row, mask in zip(gen.tolist(), enc["attention_mask"].tolist(), strict=True):
            ids = row[len(mask) - sum(mask):]
            if shape.eos_token_id in ids[sum(mask):]:
                ids = ids[: sum(mask) + ids[sum(mask):].index(shape.eos_token_id) + 1]
            out.extend(ids)
        print(f"chat batch {done}/{len(jobs)} (T={temperature})", flush=True)
    return np.asarray(out, dtype=np.uint16)


def _balanced_kmeans(features: torch.Tensor, clusters: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Cosine k-means where every cluster gets exactly len(features) / clusters members."""
    n = features.shape[0]
    size = n // clusters
    feats = F.normalize(features, dim=1)
    centroids = feats[torch.randperm(n, generator=gen)[:clusters].to(feats.device)]
    labels = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sims = (feats @ centroids.T).cpu()
        order = sims.flatten().argsort(descending=True).tolist()
        labels.fill_(-1)
        room = [size] * clusters
        left = n
        for flat in order:
            i, c = divmod(flat, clusters)
            if labels[i] < 0 and room[c] > 0:
                labels[i] = c
                room[c] -= 1
                left -= 1
                if left == 0:
                    break
        centroids = torch.stack(
            [F.normalize(feats[(labels == c).to(feats.device)].mean(0), dim=0) for c in range(clusters)]
        )
    return labels


def calibrate(
    net: Distiller, tokens: np.ndarray, windows: int, design: MoeDesign, shape: LlamaShape
) -> dict[int, LayerPlan]:
    """Neuron order, routers and shared gates for every MoE layer from the teacher's activations."""
    gen = torch.Generator().manual_seed(SEED)
    starts = torch.randint(0, len(tokens) - SEQ, (windows,), generator=gen).tolist()
    ids = torch.from_numpy(np.stack([tokens[s:s + SEQ] for s in starts]).astype(np.int64)).to(_device())
    routed = design.routed(shape)
    plans: dict[int, LayerPlan] = {}
    captured: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad(), torch.autocast(ids.device.type, torch.bfloat16, enabled=ids.device.type == "cuda"):
        for chunk in ids.split(16):
            part: dict[int, torch.Tensor] = {}
            net(chunk, student=False, capture=part)
            for layer, x in part.items():
                captured.setdefault(layer, []).append(x.reshape(-1, shape.hidden).float())
    for layer in design.moe_layers(shape):
        x = torch.cat(captured.pop(layer))
        p = f"model.layers.{layer}.mlp"
        gate, up, down = (net._b(f"{p}.{n}_proj.weight").float() for n in ("gate", "up", "down"))
        contrib = (F.silu(x @ gate.T) * (x @ up.T)).abs() * down.norm(dim=0)  # [T, I]
        shared = contrib.mean(0).argsort(descending=True)[: design.shared]
        rest = torch.tensor(sorted(set(range(shape.intermediate)) - set(shared.tolist())), device=x.device)
        sample = torch.randperm(x.shape[0], generator=gen)[:8192].to(x.device)
        labels = _balanced_kmeans(contrib[sample][:, rest].T, design.num_experts, 12, gen).to(x.device)
        groups = [rest[labels == e] for e in range(design.num_experts)]
        order = torch.cat([shared.sort().values] + [g.sort().values for g in groups])
        mass = torch.stack([contrib[:, g].sum(1) for g in groups], dim=1)
        target = mass.clamp(min=1e-6).log()
        target = target - target.mean(1, keepdim=True)
        ridge = 1e-2 * torch.eye(shape.hidden, device=x.device)
        router = torch.linalg.solve(x.T @ x / len(x) + ridge, x.T @ target / len(x)).T  # [E, H]
        router = router * (0.3 / (x @ router.T).std().clamp(min=1e-6))
        plans[layer] = LayerPlan(order=order.cpu(), router=router.cpu(), shared_gate=torch.zeros(1, shape.hidden))
        assert len(order) == shape.intermediate and all(len(g) == routed for g in groups)
    return plans


class Batches:
    """Random SEQ-token windows: ``chat_share`` of each batch from the teacher's answers, the rest from the corpus."""

    def __init__(self, corpus: np.ndarray, chat: np.ndarray, batch: int, seed: int, chat_share: float = 0.5) -> None:
        self.sources, self.batch = [corpus, chat], batch
        self.chat_rows = round(batch * chat_share)
        self.gen = np.random.default_rng(seed)

    def __next__(self) -> torch.Tensor:
        rows = []
        for i in range(self.batch):
            src = self.sources[1 if i < self.chat_rows else 0]
            start = int(self.gen.integers(0, len(src) - SEQ))
            rows.append(src[start:start + SEQ])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def kl_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def balance_loss(net: Distiller) -> torch.Tensor:
    """Switch-style load balancing: E * sum(fraction routed * mean probability), averaged over layers."""
    e = net.design.num_experts
    return torch.stack([e * (st[0] * st[1]).sum() / net.design.top_k for st in net.router_stats]).mean()


def train(net: Distiller, batches: Batches, minutes: float, lr: float, router_lr: float, balance: float) -> list[dict]:
    """Distil for ``minutes`` of wall clock; the cosine schedule is sized from the first steps' speed."""
    device = _device()
    experts = [*net.gate_w.values(), *net.up_w.values(), *net.down_w.values(), *net.norm.values()]
    routers = [*net.router.values(), *net.shared_gate.values()]
    opt = torch.optim.AdamW([{"params": experts, "lr": lr}, {"params": routers, "lr": router_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    log: list[dict] = []
    start, total, step, warm = time.perf_counter(), None, 0, 30
    while total is None or step < total:
        ids = next(batches).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                teacher = net(ids, student=False)
            student = net(ids, student=True)
            kl = kl_loss(teacher, student)
            loss = kl + balance * balance_loss(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(experts + routers, 1.0)
        frac = step / total if total else 0.0
        factor = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group, lr0 in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr0 * factor
        opt.step()
        step += 1
        if step == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - start) / step
            total = max(step + 1, int(minutes * 60 / per_step))
            print(f"{per_step * 1000:.0f} ms/step -> {total} steps", flush=True)
        if step % 50 == 0 or step == total:
            entry = {"step": step, "kl": round(kl.item(), 4), "s": round(time.perf_counter() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return log


def evaluate(net: Distiller, tokenizer, top_k: int | None = None, windows: int | None = None) -> dict:
    """Held-out perplexity (512-token windows per document) of teacher and student, and load shares."""
    device = _device()
    result: dict = {}
    for name, docs in data.heldout().items():
        nll = {"teacher": 0.0, "student": 0.0}
        count, shares = 0, []
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids) - 1, SEQ)[:windows]:
                window = torch.tensor([ids[s:s + SEQ]], device=device)
                if window.shape[1] < 2:
                    continue
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    for who in nll:
                        logits = net(window, student=who == "student", top_k=top_k)[0, :-1].float()
                        nll[who] += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
                        if who == "student":
                            shares.append(torch.stack([st[0] for st in net.router_stats]) * (window.shape[1]))
                count += window.shape[1] - 1
        result[name] = {who: round(math.exp(v / count), 3) for who, v in nll.items()} | {"tokens": count}
        load = torch.stack(shares).sum(0)
        result[name]["max_share"] = round((load / load.sum(1, keepdim=True)).max().item() * net.design.top_k, 3)
        result[name]["shares"] = (load / load.sum(1, keepdim=True)).cpu().numpy().round(3).tolist()
    return result


def _prompt_mix(work: Path) -> dict[str, list[str]]:
    """The prompts ``python -m tools.recipe.data`` wrote beside the corpus (built on the machine that has the
    documentation), else the mix as this machine builds it."""
    path = work / "prompts.json"
    return json.loads(path.read_text()) if path.exists() else data.prompt_mix()


def answer(args: argparse.Namespace, shape: LlamaShape, dense: dict, tokenizer) -> np.ndarray:
    """Teacher answers to the prompt mix's ``--kinds`` into ``chat.bin``; ``--append`` adds them to the answers
    already there (a later round's new prompts) and records each generation in ``chat.json``."""
    mix = {kind: prompts for kind, prompts in _prompt_mix(args.work).items() if not args.kinds or kind in args.kinds}
    if args.kinds and set(args.kinds) - set(mix):
        raise SystemExit(f"unknown prompt kinds: {', '.join(sorted(set(args.kinds) - set(mix)))}")
    prompts = [p for kind in mix.values() for p in kind][: args.prompts]
    chat = generate_chat(shape, dense, tokenizer, prompts, args.samples, args.max_new, 512, args.temperatures)
    record = {"prompts": {kind: len(p) for kind, p in mix.items()}, "used": len(prompts), "samples": args.samples,
              "temperatures": list(args.temperatures), "max_new": args.max_new, "tokens": int(chat.size)}
    bin_path, json_path = args.work / "chat.bin", args.work / "chat.json"
    if args.append:
        earlier = json.loads(json_path.read_text())
        chat = np.concatenate([np.frombuffer(bin_path.read_bytes(), dtype=np.uint16), chat])
        record = earlier | {"appended": [*earlier.get("appended", []), record], "tokens": int(chat.size)}
    bin_path.write_bytes(chat.tobytes())
    json_path.write_text(json.dumps(record, indent=2))
    return chat


def _setup(gguf: Path, work: Path):
    shape, dense = read_dense(gguf)
    tokenizer = load_tokenizer(gguf)
    corpus = np.frombuffer((work / "corpus.bin").read_bytes(), dtype=np.uint16)
    return shape, dense, tokenizer, corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "answer", "train"])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--router-lr", type=float, default=2e-3)
    parser.add_argument("--balance", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=2, help="teacher answers per prompt and temperature")
    parser.add_argument("--temperatures", type=lambda t: tuple(float(x) for x in t.split(",")), default=(0.7,),
                        help="comma-separated sampling temperatures for the teacher's answers")
    parser.add_argument("--chat-share", type=float, default=0.5,
                        help="share of each training batch taken from the teacher's answers")
    parser.add_argument("--max-new", type=int, default=320)
    parser.add_argument("--kinds", type=lambda k: tuple(k.split(",")), default=(),
                        help="comma-separated prompt kinds the teacher answers (default: all)")
    parser.add_argument("--append", action="store_true", help="add the answers to chat.bin instead of replacing it")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--resume", type=Path, help="continue from a shipped folder written by an earlier train")
    parser.add_argument("--experts", type=int, default=MoeDesign.num_experts, help="routed experts per layer (prepare)")
    parser.add_argument("--top-k", type=int, default=MoeDesign.top_k, help="experts each token uses (prepare)")
    parser.add_argument("--shared", type=int, default=MoeDesign.shared, help="neurons of the shared expert (prepare)")
    parser.add_argument("--prompts", type=int, help="use only the first N chat prompts (smoke tests)")
    parser.add_argument("--eval-windows", type=int, help="evaluate only N windows per document (smoke tests)")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    shape, dense, tokenizer, corpus = _setup(args.gguf, args.work)
    device = _device()
    if args.stage in ("prepare", "answer"):
        t0 = time.perf_counter()
        design = MoeDesign(num_experts=args.experts, top_k=args.top_k, shared=args.shared)
        design.routed(shape)  # an uneven split fails here, not after the teacher's answers
        chat = answer(args, shape, dense, tokenizer)
        print(f"chat: {chat.size} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.stage == "answer":
            return
        base = convert(shape, dense, design, exact_plan(shape, design))
        net = Distiller(shape, design, base, dense).to(device)
        plans = calibrate(net, np.concatenate([corpus, chat]), args.calibration, design, shape)
        torch.save({"design": asdict(design), "plans": {k: vars(v) for k, v in plans.items()}}, args.work / "plans.pt")
        print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)
        return
    chat = np.frombuffer((args.work / "chat.bin").read_bytes(), dtype=np.uint16)
    if args.resume:
        design, plans, earlier = shipped.load(args.resume)
    else:
        prepared = torch.load(args.work / "plans.pt")
        design = MoeDesign(**prepared["design"])
        plans, earlier = {k: LayerPlan(**v) for k, v in prepared["plans"].items()}, None
    start_state = convert(shape, dense, design, plans)
    base_state = convert(
        shape, dense, design, {k: LayerPlan(p.order, p.router, p.shared_gate) for k, p in plans.items()}
    )
    net = Distiller(shape, design, start_state, dense).to(device)
    before = evaluate(net, tokenizer, windows=args.eval_windows)
    print(
        "before",
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "shares"} for k, v in before.items()}),
        flush=True,
    )
    log = train(net, Batches(corpus, chat, args.batch, SEED, args.chat_share), args.minutes, args.lr, args.router_lr,
                args.balance)
    trained = net.trained_state()
    for layer, plan in plans.items():
        src = f"model.layers.{layer}.mlp"
        plan.router = trained[f"{src}.gate.weight"]
        plan.shared_gate = trained[f"{src}.shared_expert_gate.weight"]
        plan.norm = trained[f"model.layers.{layer}.post_attention_layernorm.weight"]
        plan.deltas = {k[len(src) + 1:]: v - base_state[k].float() for k, v in trained.items()
                       if k.startswith(src + ".") and k.endswith("proj.weight")}
    after = evaluate(net, tokenizer, windows=args.eval_windows)
    recipe = {
        "seed": SEED,
        "seq": SEQ,
        "batch": args.batch,
        "minutes": args.minutes,
        "lr": args.lr,
        "router_lr": args.router_lr,
        "balance": args.balance,
        "chat": json.loads(chat_record.read_text()) if (chat_record := args.work / "chat.json").exists() else None,
        "chat_share": args.chat_share,
        "calibration_windows": args.calibration,
        "steps": log[-1]["step"],
        "log": log,
        "before": before,
        "after_fp32": after,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "resumed_from": earlier,
        "corpus": json.loads((args.work / "corpus.json").read_text()),
        "chat_tokens": int(chat.size),
    }
    out = args.out or args.work / "shipped"
    written = shipped.save(out, design, plans, recipe)
    _, shipped_plans, _ = shipped.load(out)
    net_q = Distiller(shape, design, convert(shape, dense, design, shipped_plans), dense).to(device)
    quantised = evaluate(net_q, tokenizer, windows=args.eval_windows)
    recipe["after_shipped"] = quantised
    shipped.save(out, design, plans, recipe)
    print("after", json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "shares"} for k, v in after.items()}))
    print("shipped", json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "shares"} for k, v in quantised.items()}))
    print("files", [(p.name, p.stat().st_size) for p in written])


if __name__ == "__main__":
    main()
