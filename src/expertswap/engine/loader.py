"""Build an engine's parts from a model folder: every check made once, every part wired to the ones it uses.

``Engine.load`` calls ``build`` and then starts the background threads; nothing here starts a thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from expertswap.engine.budget.controller import BudgetController
from expertswap.engine.budget.swapper import Swapper
from expertswap.engine.budget.watcher import MemoryWatcher
from expertswap.engine.decode.attention_shapes import use_stepped_attention
from expertswap.engine.decode.compact_step import SUPPORTED as COMPACT_FAMILIES
from expertswap.engine.decode.compact_step import CompactModel
from expertswap.engine.decode.compact_step import supports as supports_compact
from expertswap.engine.decode.decoder import Decoder
from expertswap.engine.decode.grammar import GrammarCompiler
from expertswap.engine.decode.graphed_step import GraphedDecode
from expertswap.engine.decode.prefixes import Prefixes
from expertswap.engine.decode.session import Sessions
from expertswap.engine.decode.step import StepGuard
from expertswap.engine.device import resolve_device
from expertswap.engine.moe.committee import Committee
from expertswap.engine.moe.copier import Copier
from expertswap.engine.moe.expert_cache import check_eviction
from expertswap.engine.moe.expert_rows import supports_rows
from expertswap.engine.moe.policies import choose_policy
from expertswap.engine.moe.runtime import Runtime
from expertswap.engine.reporter import Reporter
from expertswap.engine.step_hooks import BetweenSteps
from expertswap.engine.weights.checkpoint import Checkpoint, read_config
from expertswap.engine.weights.families import Family
from expertswap.engine.weights.host_memory import own_weights, return_large_frees
from expertswap.engine.weights.packed import pack_linears, packing_pays
from expertswap.engine.weights.packed_file import packed_folder
from expertswap.engine.weights.packer import Packer
from expertswap.engine.weights.quantize import INT4_GROUPS, int4_shape_error, native_packing
from expertswap.engine.weights.skeleton import ExpertsSite, load_skeleton
from expertswap.engine.weights.store import ExpertStore, LayerExperts, resolve_layer
from expertswap.engine.weights.validate import check_layers
from expertswap.protocol.budget import parse_budget
from expertswap.protocol.errors import ModelFormatError, SettingsError, UnsupportedArchitectureError
from expertswap.protocol.options import QUANTIZATIONS
from expertswap.protocol.plan import plan_capacities


@dataclass
class Parts:
    """An engine, built and wired, its threads not yet started."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    family: Family
    committees: list[Committee]
    routers: list[nn.Module | None]  # each MoE layer's router, beside its committee
    row_path: bool  # every layer computes its experts one at a time on their rows (lowbit needs it)
    store: ExpertStore
    runtime: Runtime
    copier: Copier
    budget: BudgetController
    swapper: Swapper
    watcher: MemoryWatcher
    reporter: Reporter
    sessions: Sessions
    guard: StepGuard
    decoder: Decoder
    packer: Packer | None  # writes the packed expert file (quantised experts, a pack_root given)


def build(model_dir: str | Path, budget: str | int, device: str, policy: str, ram_tier: bool, dtype: str | torch.dtype,
          skip_threshold: float, swapper: bool, eviction: str, quantize: str | None, dense: str | None = None,
          pack_root: Path | None = None) -> Parts:
    """Every part of an engine for ``model_dir`` (the arguments are ``Engine.load``'s)."""
    return_large_frees()
    torch_device = resolve_device(device)
    choose_policy(policy, torch_device.type, skip_threshold)  # a wrong name fails before anything is read
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise SettingsError(f"unknown quantisation {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    check_eviction(eviction)
    _check_dense(dense, quantize, torch_device)
    folder, config, family = read_config(model_dir)
    native, block = native_packing(config)
    if native is not None and quantize is not None:
        raise SettingsError(f"this checkpoint's experts are already {native}; --quantize applies to unquantised "
                            "checkpoints")
    checkpoint = Checkpoint(folder)
    try:
        check_layers(list(checkpoint.entries), int(config.num_hidden_layers))
        model, sites = load_skeleton(str(folder), family, torch_device, dtype,
                                     config.quantization_config if native else None)
        row_path = all(supports_rows(site.module) for site in sites)
        miss_policy = choose_policy(policy, torch_device.type, skip_threshold, row_path)  # now the layout is known
        if quantize is not None and not row_path:
            raise UnsupportedArchitectureError(f"quantised experts are not supported for {family.name} yet")
        top_k = int(config.num_experts_per_tok)
        layers = {
            site.layer: resolve_layer(checkpoint, family, site.layer, int(site.module.num_experts), top_k,
                                      site.params, quantize or native, block, slots_plain=not row_path)
            for site in sites
        }
        _check_int4_shapes(quantize, layers.values())
        store = ExpertStore(checkpoint, layers, pin_memory=torch_device.type == "cuda")
        budget_bytes = parse_budget(budget, store.total_expert_bytes)
        capacities = plan_capacities(budget_bytes, [spec.shape for spec in layers.values()])
        runtime = Runtime(policy=miss_policy, eviction=eviction,
                          packed_slots=any(spec.quantize for spec in layers.values()))
        packer = None
        if pack_root is not None and quantize is not None:  # written layers count before the first experts are read
            packer = Packer(store, packed_folder(pack_root, checkpoint, quantize), runtime.telemetry, runtime.lock)
            packer.attach_written()
        if ram_tier:
            store.fill_ram_tier()
        copier = Copier(torch_device)
        routers = [_router(site) for site in sites]
        committees = [Committee(site.module, layers[site.layer], store, runtime, capacity, torch_device, router,
                                copier) for site, capacity, router in zip(sites, capacities, routers, strict=True)]
        for site, committee in zip(sites, committees, strict=True):
            setattr(site.parent, site.name.rpartition(".")[2], committee)  # the committee replaces the experts
        tokenizer = _load_tokenizer(folder)
        return _wire(model, tokenizer, family, committees, row_path, store, runtime, copier, budget_bytes, swapper,
                     routers, dense, packer)
    except BaseException:  # a broken folder, or no memory for the compact step: no safetensors file left open
        checkpoint.close()
        raise


def _check_dense(dense: str | None, quantize: str | None, device: torch.device) -> None:
    """``--dense int8`` quantises the weights outside the experts for the CPU's int8 kernel, beside quantised
    experts (so the model is marked as not the original wherever its quantisation is shown)."""
    if dense is None:
        return
    if dense != "int8":
        raise SettingsError(f"unknown dense quantisation {dense!r}: use int8")
    if quantize is None:
        raise SettingsError("--dense int8 goes with quantised experts: add --quantize (int8, for example)")
    if device.type != "cpu":
        raise SettingsError("--dense int8 runs on the CPU's int8 kernel; on a GPU leave it out")


def _check_int4_shapes(quantize: str | None, layers: Iterable[LayerExperts]) -> None:
    """int4 groups must tile every expert matrix's rows, and the CPU kernel takes rows by 16: refused before a read."""
    if quantize not in INT4_GROUPS:
        return
    for spec in layers:
        for param in spec.params:
            if len(param.shape) >= 2 and (why := int4_shape_error(param.shape, quantize)):
                raise UnsupportedArchitectureError(f"layer {spec.layer} {param.name}: {why}")


def _wire(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, family: Family,
          committees: list[Committee], row_path: bool, store: ExpertStore, runtime: Runtime, copier: Copier,
          budget_bytes: int, swaps: bool, routers: list[nn.Module | None], dense: str | None,
          packer: Packer | None) -> Parts:
    """The parts above the committees, each given the ones it talks to."""
    device = model.device
    compact = CompactModel(model) if supports_compact(model) else None
    if dense is not None:
        if compact is None:
            raise UnsupportedArchitectureError(f"--dense int8 is not supported for {family.name} yet (it is for "
                                               f"{', '.join(COMPACT_FAMILIES)})")
        compact.quantize_dense()
    graphed = GraphedDecode(compact, runtime) if compact is not None and device.type == "cuda" else None
    if compact is None:
        use_stepped_attention(model)
    if compact is None and packing_pays(device, model.dtype):
        pack_linears(model)
    own_weights(model)
    budget = BudgetController(committees, runtime, budget_bytes, store.total_expert_bytes, device)
    swapper = Swapper(committees, store, runtime, copier, budget)
    swapper.enabled = swaps
    watcher = MemoryWatcher(budget, runtime.telemetry, device)
    reporter = Reporter(committees, runtime, watcher)
    context = getattr(model.config, "max_position_embeddings", None)
    sessions = Sessions(model, compact, graphed, context if isinstance(context, int) else None)
    guard = StepGuard(runtime.lock, BetweenSteps(budget, runtime))
    prefixes = Prefixes(sessions, lambda: runtime.output_key(budget.next_bytes))
    stop_ids = _stop_ids(model, tokenizer)
    grammars = GrammarCompiler(tokenizer, stop_ids) if tokenizer is not None else None
    decoder = Decoder(prefixes, guard, stop_ids, reporter, int(model.config.vocab_size), grammars)
    return Parts(model=model, tokenizer=tokenizer, family=family, committees=committees, routers=routers,
                 row_path=row_path, store=store, runtime=runtime, copier=copier, budget=budget, swapper=swapper,
                 watcher=watcher, reporter=reporter, sessions=sessions, guard=guard, decoder=decoder, packer=packer)


def _router(site: ExpertsSite) -> nn.Module | None:
    """The MoE layer's router module (``gate`` or ``router`` beside its experts), whose logits substitute reads."""
    return next((m for m in (getattr(site.parent, n, None) for n in ("gate", "router")) if m is not None), None)


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config, model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # a malformed tokenizer file surfaces as any of a dozen exception types
        raise ModelFormatError(f"cannot read the tokenizer in {folder}: {exc}".splitlines()[0]) from exc
