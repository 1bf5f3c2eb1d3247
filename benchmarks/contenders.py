"""One measurement in a fresh process (so peak RSS belongs to it alone); prints one JSON line.

    python -m benchmarks.contenders KIND FOLDER BUDGET TOKENS DEVICE

KIND is ``floor`` (the runtime alone: torch, transformers, the engine and the tokenizer, no weights),
``full``, ``accelerate`` (device_map="auto" with max_memory = non-expert bytes + budget, the rest
offloaded the Hugging Face way), ``lru`` (on-demand loading into a per-layer LRU cache, no importance, no
background swapper: mixtral-offloading's design, on ExpertSwap's loader) or ``expertswap:POLICY[:QUANTISATION]``
(QUANTISATION ``KIND+dense``: the weights outside the experts in int8 too, ``--dense int8``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from expertswap.engine.weights.compat import mkldnn_bf16_supported

PROMPT = "Explain how a Python dictionary stores its keys and what makes lookups fast."
def run_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs and on CPUs with oneDNN bf16 kernels (as the app runs); float32 on CPUs without them."""
    if device.split(":")[0] == "cuda" or mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _timed_decode(step, first_ids: torch.Tensor, tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decode with a KV cache; returns the ids and each token's latency (the first = time to first token)."""
    out, times = [], []
    ids, cache = first_ids, None
    for _ in range(tokens):
        start = time.perf_counter()
        logits, cache = step(ids, cache)
        token = int(logits[0, -1].argmax())
        times.append(time.perf_counter() - start)
        out.append(token)
        ids = torch.tensor([[token]], device=first_ids.device)
    return out, times


def offload_cap(folder: str, budget: str, dtype: torch.dtype) -> int:
    """accelerate's max_memory: non-expert bytes + the budget, counted in the dtype the model runs in."""
    from transformers import AutoConfig

    from expertswap.models.fit import fit_report

    report = fit_report(folder, budget)  # checkpoint bytes
    scale = dtype.itemsize / AutoConfig.from_pretrained(folder).dtype.itemsize
    return int((report.non_expert_bytes + report.budget_bytes) * scale)


def run_transformers(folder: str, budget: str, tokens: int, device: str, offload: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertswap.engine.decode.step import forward_mode
    from expertswap.engine.observe.memory import peak_rss_bytes

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = run_dtype(device)
    kwargs: dict = {"dtype": dtype}
    # accelerate spills offloaded layers to disk here; removed when the decode is done
    with tempfile.TemporaryDirectory(prefix="offload-", ignore_cleanup_errors=True) as scratch:
        if offload:
            cap = offload_cap(folder, budget, dtype)
            target = 0 if device.startswith("cuda") else "cpu"
            kwargs |= {"device_map": "auto", "max_memory": {target: cap, **({"cpu": 10**12} if target == 0 else {})},
                       "offload_folder": scratch}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        if not offload:
            model = model.to(device)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(model.device)

        def step(x, cache):
            with forward_mode():  # the engine's attention backends, so attention costs every contender the same
                out = model(input_ids=x, past_key_values=cache, use_cache=True)
            return out.logits, out.past_key_values

        out, times = _timed_decode(step, ids, tokens)
    return {"ids": out, "times": times, "peak_rss": peak_rss_bytes(), "hit_rate": None, "bytes_loaded": None,
            "peak_vram": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0}


def run_expertswap(folder: str, policy: str, budget: str, tokens: int, device: str, lru: bool = False,
                   quantize: str | None = None) -> dict:
    from expertswap.models import cache_root

    kind, _, dense = (quantize or "").partition("+")
    from expertswap.engine import Engine
    from expertswap.protocol import SamplingSettings

    # on a GPU every expert waits in pinned host RAM, as accelerate keeps its offloaded layers in RAM
    engine = Engine.load(folder, budget=budget, policy=policy, device=device, dtype=run_dtype(device),
                         ram_tier=device.startswith("cuda"), skip_threshold=0.3 if policy == "skip" else 0.0,
                         swapper=not lru, eviction="lru" if lru else "importance", quantize=kind or None,
                         dense="int8" if dense else None, pack_root=cache_root() / "packed")  # as the CLI loads
    ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
    out, times = [], []
    last = time.perf_counter()
    for token in engine.generate(ids, SamplingSettings(max_new_tokens=tokens)):
        now = time.perf_counter()
        out.append(token)
        times.append(now - last)
        last = now
    s = engine.stats()
    engine.close()
    return {"ids": out, "times": times, "peak_rss": s.peak_rss_bytes, "hit_rate": s.hit_rate,
            "bytes_loaded": s.bytes_loaded,
            "peak_vram": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0}


def prepack(folder: str, quantize: list[str]) -> None:
    """Write the packed expert file of each quantisation before anything is timed (``expertswap-cli pack``, in
    the cache the contenders load from as the CLI does): a contender never writes it while it is measured."""
    for kind in sorted({q.partition("+")[0] for q in quantize if q}):
        subprocess.run([sys.executable, "-m", "expertswap.cli", "pack", "--model", folder, "--quantize", kind,
                        "--device", "cpu"], check=True, capture_output=True, timeout=3600)


def run_floor(folder: str) -> dict:
    """The runtime floor: what the process holds before any weight, measured in the same run as the contenders."""
    from transformers import AutoTokenizer

    from expertswap.engine import Engine  # noqa: F401  (its imports are the floor)
    from expertswap.engine.observe.memory import peak_rss_bytes

    AutoTokenizer.from_pretrained(folder)
    return {"ids": [], "times": [], "peak_rss": peak_rss_bytes(), "hit_rate": None, "bytes_loaded": None,
            "peak_vram": 0}


def main() -> None:
    kind, folder, budget, tokens, device = sys.argv[1:6]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if kind == "floor":
        result = run_floor(folder)
    elif kind in ("full", "accelerate"):
        result = run_transformers(folder, budget, int(tokens), device, offload=kind == "accelerate")
    elif kind == "lru":
        result = run_expertswap(folder, "exact", budget, int(tokens), device, lru=True)
    else:  # expertswap:POLICY, or expertswap:POLICY:QUANTISATION
        _, policy, *quantize = kind.split(":")
        result = run_expertswap(folder, policy, budget, int(tokens), device, quantize=quantize[0] if quantize else None)
    times = result.pop("times")
    decode = times[1:]
    result |= {
        "threads": torch.get_num_threads(),
        "ttft": times[0] if times else 0.0,
        "tok_s": len(decode) / sum(decode) if decode else 0.0,
        "p50_ms": 1000 * _percentile(decode, 0.5),
        "p99_ms": 1000 * _percentile(decode, 0.99),
    }
    idle = time.process_time()  # every thread of the process, over half a second with nothing to do
    time.sleep(0.5)
    result["idle_cores"] = (time.process_time() - idle) / 0.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
