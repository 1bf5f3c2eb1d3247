"""The engine's public face: load a model under a budget, stream replies, report stats."""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from expertswap.engine.budget.controller import BudgetController
from expertswap.engine.budget.swapper import Swapper
from expertswap.engine.budget.watcher import MemoryWatcher, free_memory_probe
from expertswap.engine.decode import chat_template
from expertswap.engine.decode.compact_step import CompactModel
from expertswap.engine.decode.compact_step import supports as supports_compact
from expertswap.engine.decode.decoder import Decoder, TokenChunk, TokenScores
from expertswap.engine.decode.generation import IncrementalDecoder
from expertswap.engine.decode.graphed_step import GraphedDecode
from expertswap.engine.decode.history import Message
from expertswap.engine.decode.session import CompactSession, Session, TransformersSession
from expertswap.engine.decode.step import StepGuard
from expertswap.engine.device import resolve_device
from expertswap.engine.moe.committee import Committee
from expertswap.engine.moe.copier import Copier
from expertswap.engine.moe.expert_rows import supports_rows
from expertswap.engine.moe.runtime import Runtime
from expertswap.engine.observe.counters import totals
from expertswap.engine.observe.memory import current_rss_bytes, peak_rss_bytes
from expertswap.engine.observe.trace import TraceHeader, TraceRecorder
from expertswap.engine.weights.checkpoint import Checkpoint, read_config
from expertswap.engine.weights.families import Family
from expertswap.engine.weights.host_memory import own_weights, return_large_frees
from expertswap.engine.weights.packed import PackedLinear, pack_linears, packing_pays
from expertswap.engine.weights.quantize import native_packing
from expertswap.engine.weights.skeleton import load_skeleton
from expertswap.engine.weights.store import ExpertStore, resolve_layer
from expertswap.engine.weights.validate import check_layers
from expertswap.protocol.budget import parse_budget
from expertswap.protocol.errors import (
    BudgetError,
    EngineBusyError,
    EngineClosedError,
    ModelFormatError,
    PolicyError,
    PromptError,
    SettingsError,
    UnsupportedArchitectureError,
)
from expertswap.protocol.events import MemorySample, ResidencySnapshot, Subscription, TokenStats
from expertswap.protocol.options import DEFAULT_EVICTION, EVICTIONS, POLICIES, QUANTIZATIONS
from expertswap.protocol.plan import LayerShape, committee_size, plan_capacities
from expertswap.protocol.sampling import SamplingSettings
from expertswap.protocol.stats import EngineStats

_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """A MoE model whose experts live in per-layer committees sized by a byte budget."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        family: Family,
        committees: list[Committee],
        store: ExpertStore,
        runtime: Runtime,
        budget_bytes: int,
        swapper: bool,
        copier: Copier,
        routers: list[nn.Module | None],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.committees = committees
        self.routers = routers  # each MoE layer's router, beside its committee
        self.row_path = all(supports_rows(c.inner) for c in committees)  # lowbit computes misses on it
        self.store = store
        self.runtime = runtime
        self.device = model.device
        self.telemetry = runtime.telemetry
        self.budget = BudgetController(committees, runtime, budget_bytes, store.total_expert_bytes, self.device,
                                       wake=lambda: self.swapper.wake(),
                                       applied=lambda: self.telemetry.emit(self.residency()))
        self.guard = StepGuard(runtime.lock, self._before_step, self.budget.shrink_after_oom, self._after_step)
        self.compact = CompactModel(model) if supports_compact(model) else None
        self.graphed = GraphedDecode(self.compact, runtime) if self.compact and self.device.type == "cuda" else None
        if self.compact is None and packing_pays(self.device, model.dtype):
            pack_linears(model)
        own_weights(model)
        context = getattr(model.config, "max_position_embeddings", None)
        self.decoder = Decoder(self._new_session, context if isinstance(context, int) else None, self.guard,
                               self._stop_ids(), self._after_token, self._emit_memory_sample)
        self._peak_resident = self.resident_expert_bytes()
        self.copier = copier
        self.swapper = Swapper(committees, store, runtime, copier, self.budget.settle)
        self.swapper.enabled = swapper
        self.swapper.start()
        self.watcher = MemoryWatcher(self._emit_memory_sample,
                                     lambda free: self.budget.follow(free, self.resident_expert_bytes()),
                                     free_memory_probe(self.device))
        self.watcher.start()
        _LIVE.add(self)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        budget: str | int = "100%",
        device: str = "cpu",
        policy: str = "exact",
        ram_tier: bool = False,
        dtype: str | torch.dtype = "auto",
        skip_threshold: float = 0.0,
        swapper: bool = True,
        eviction: str = DEFAULT_EVICTION,
        quantize: str | None = None,
    ) -> Engine:
        """Load ``model_dir`` with only a budget's worth of experts resident on ``device``.

        ``quantize`` (int8, nf4, fp4) quantises every expert when it is read: the budget then counts
        quantised bytes, and the output is the quantised model's, not the original's.
        """
        return_large_frees()
        torch_device = resolve_device(device)
        _check_policy(policy, torch_device, skip_threshold)
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise SettingsError(f"unknown quantisation {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
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
            top_k = int(config.num_experts_per_tok)
            row_path = all(supports_rows(site.module) for site in sites)
            _check_policy(policy, torch_device, skip_threshold, row_path)
            if quantize is not None and not row_path:
                raise UnsupportedArchitectureError(f"quantised experts are not supported for {family.name} yet")
            layers = {
                site.layer: resolve_layer(checkpoint, family, site.layer, int(site.module.num_experts), top_k,
                                          site.params, quantize or native, block, slots_plain=not row_path)
                for site in sites
            }
            store = ExpertStore(checkpoint, layers, pin_memory=torch_device.type == "cuda")
            shapes = [LayerShape(spec.num_experts, spec.top_k, spec.expert_bytes) for spec in layers.values()]
            budget_bytes = parse_budget(budget, store.total_expert_bytes)
            capacities = plan_capacities(budget_bytes, shapes)
            if ram_tier:
                store.fill_ram_tier()
            if eviction not in EVICTIONS:
                raise PolicyError(f"eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
            runtime = Runtime(policy=policy, skip_threshold=skip_threshold, eviction=eviction,
                              packed_slots=any(spec.quantize for spec in layers.values()))
            committees, routers = [], []
            copier = Copier(torch_device)
            for site, capacity in zip(sites, capacities, strict=True):
                attr = site.name.rpartition(".")[2]
                router = next(
                    (m for m in (getattr(site.parent, n, None) for n in ("gate", "router")) if m is not None), None
                )
                committee = Committee(site.module, layers[site.layer], store, runtime, capacity, torch_device, router,
                                      copier)
                setattr(site.parent, attr, committee)
                committees.append(committee)
                routers.append(router)
            tokenizer = _load_tokenizer(folder)
            return cls(model, tokenizer, family, committees, store, runtime, budget_bytes, swapper, copier, routers)
        except BaseException:  # a broken folder must not leave its safetensors files open
            checkpoint.close()
            raise

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def total_expert_bytes(self) -> int:
        return self.store.total_expert_bytes

    @property
    def minimum_budget_bytes(self) -> int:
        return self.budget.minimum_bytes

    @property
    def budget_bytes(self) -> int:
        """The budget in force (a request waits for the next step)."""
        return self.budget.budget_bytes

    @property
    def policy(self) -> str:
        """The miss policy in force."""
        return self.runtime.policy

    @property
    def context_tokens(self) -> int | None:
        """The model's context length, when its config gives one."""
        return self.decoder.context

    @property
    def quantize(self) -> str | None:
        """How the experts were quantised when read (int8, nf4, fp4), or None: as stored."""
        spec = self.committees[0].spec
        return None if spec.native else spec.packing

    @property
    def native_format(self) -> str | None:
        """The packed format the checkpoint ships its experts in (fp8, mxfp4), or None: unquantised."""
        spec = self.committees[0].spec
        return spec.packing if spec.native else None

    @property
    def total_experts(self) -> int:
        """Experts in all MoE layers together."""
        return sum(c.num_experts for c in self.committees)

    @property
    def policies(self) -> tuple[str, ...]:
        """The miss policies this engine takes: ``cpu`` (host beside a GPU) only on CUDA, ``lowbit`` on the row path."""
        return tuple(p for p in POLICIES
                     if (p != "cpu" or self.device.type == "cuda") and (p != "lowbit" or self.row_path))

    @property
    def layer_shapes(self) -> list[LayerShape]:
        """Each MoE layer's shape, as the planner sizes its committee."""
        return [c.shape for c in self.committees]

    def committee_size(self, budget_bytes: int) -> int:
        """How many experts (all MoE layers together) the planner keeps resident at ``budget_bytes``."""
        return committee_size(budget_bytes, self.layer_shapes)

    def resident_expert_bytes(self) -> int:
        """Bytes held by every committee's slot tensors right now."""
        return sum(c.resident_bytes for c in self.committees)

    # ---- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return list(self._require_tokenizer()(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation wrapped in the tokenizer's chat template, ready for the reply."""
        tokenizer = self._require_tokenizer()
        for message in messages:
            _check_text(message.get("content", ""))
        if not getattr(tokenizer, "chat_template", None):
            raise ModelFormatError("this model's tokenizer has no chat template; use plain prompts")
        return list(tokenizer(chat_template.render(tokenizer, messages), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._require_tokenizer().decode(list(ids), skip_special_tokens=True))

    # ---- generation --------------------------------------------------------------------------
    def logits(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Logits for every position of ``input_ids`` (one forward, misses loaded exactly), on the CPU."""
        return self.decoder.logits(input_ids)

    def score(self, input_ids: Sequence[int], chunk: int = 16, prompt: int = 1) -> TokenScores:
        """Loss and top-1 prediction for each token after the first, read the way a reply is decoded.

        The first ``prompt`` tokens run as a prefill; the rest go in ``chunk`` at a time through the
        KV cache under decode rules (substitute and cpu never load) with the swapper woken between
        chunks, so a budget's quality cost is measured as a chat would pay it.
        """
        return self.decoder.score(input_ids, chunk, prompt, between=self.swapper.wake)

    def pin_committee(self, experts: dict[int, Sequence[int]] | None) -> None:
        """Hold these experts in each listed layer and stop all loading: a static committee (None releases).

        Only with the ``substitute`` policy: while pinned nothing is loaded, prompts included, and every
        miss goes to a resident expert. It is what a never-swapped committee costs, kept measurable.
        """
        self._require_open()
        with self.runtime.lock:
            if experts is None:
                self.runtime.pinned = False
                self.swapper.wake()
                return
            if self.runtime.policy != "substitute":
                raise PolicyError(f"a pinned committee needs the substitute policy, not {self.runtime.policy!r}")
            self.budget.apply_pending()
            by_layer = {c.layer: c for c in self.committees}
            for layer, wanted in experts.items():
                committee = by_layer.get(layer)
                if committee is None or not all(0 <= e < committee.num_experts for e in wanted):
                    raise ValueError(f"layer {layer}: no such MoE layer or expert ids out of range: {sorted(wanted)}")
                if len(set(wanted)) > committee.capacity:
                    raise BudgetError(f"layer {layer} holds {committee.capacity} experts at this budget, "
                                      f"asked for {len(set(wanted))}")
            for layer, wanted in experts.items():
                by_layer[layer].make_resident(sorted(set(wanted)))
            self.runtime.pinned = True

    def generate(
        self, input_ids: Sequence[int], settings: SamplingSettings = SamplingSettings(),
        cancel: threading.Event | None = None,
    ) -> Iterator[int]:
        """Yield new token ids (synchronously) until EOS, ``max_new_tokens`` or cancellation."""
        return self.decoder.generate(input_ids, settings, cancel)

    async def stream_chat(
        self, messages: Sequence[Message], settings: SamplingSettings = SamplingSettings()
    ) -> AsyncGenerator[TokenChunk, None]:
        """Stream a reply to a conversation; closing or cancelling the iterator stops generation."""
        async for chunk in self.stream_ids(self.encode_chat(messages), settings):
            yield chunk

    async def stream_ids(
        self, input_ids: Sequence[int], settings: SamplingSettings = SamplingSettings()
    ) -> AsyncGenerator[TokenChunk, None]:
        """Generate on the decoder's worker thread, handing tokens (and their text) to the event loop."""
        async for chunk in self.decoder.stream_ids(input_ids, settings, IncrementalDecoder(self._require_tokenizer())):
            yield chunk

    def cancel(self) -> None:
        """Stop the reply in progress after its current token; safe from any thread."""
        self.decoder.cancel()

    @contextlib.contextmanager
    def record_trace(self, path: str | Path, model: str | None = None) -> Iterator[TraceRecorder]:
        """Within the block, every forward's routing goes to ``path`` as a trace (format: ``engine/observe/trace.py``).

        ``model`` names the model in the header (default: its folder's name).

        Decode then runs eagerly (a captured CUDA graph would not call the recorder).
        """
        c = self.committees
        folder = Path(self.model.config.name_or_path or "model").name
        name = model or folder
        tokenizer = Path(getattr(self.tokenizer, "name_or_path", "") or "").name or None
        header = TraceHeader(model=name, family=self.family.model_type,
                             layers=[m.layer for m in c], experts=c[0].num_experts, top_k=c[0].top_k,
                             tokenizer=name if tokenizer == folder else tokenizer,  # the model's own
                             expert_bytes=c[0].spec.expert_bytes)
        recorder = TraceRecorder(path, header)
        with self.runtime.lock:
            if self.runtime.trace is not None:
                recorder.close()
                raise EngineBusyError("a trace is already being recorded")
            self.runtime.trace = recorder
        hooks = [here.register_forward_hook(_guess_next(recorder, following, c[i + 1].layer, c[i + 1].top_k))
                 for i, (here, following) in enumerate(itertools.pairwise(self.routers))
                 if here is not None and following is not None]
        try:
            yield recorder
        finally:
            for hook in hooks:
                hook.remove()
            with self.runtime.lock:
                self.runtime.trace = None
            recorder.close()

    # ---- live committee -----------------------------------------------------------------------
    def subscribe(self, maxsize: int = 100_000) -> Subscription:
        """A queue of every telemetry event from now on, the committees as they are first; ``drain()`` it from any
        thread. Under the step lock, so no swap falls between the snapshot and the events that follow it."""
        with self.runtime.lock:
            subscription = self.telemetry.subscribe(maxsize)
            subscription.put(self.residency())
        return subscription

    def set_budget(self, budget: str | int, reason: str = "user") -> int:
        """Ask for a new budget from any thread, also mid-reply; it is in force before the next token.

        Returns the budget in bytes. Raises ``BudgetTooSmallError`` below the minimum. ``reason`` is
        carried by the ``BudgetChange`` events: "user", "follow" or "oom".
        """
        self._require_open()
        return self.budget.request(budget, reason)

    def set_policy(self, policy: str, skip_threshold: float | None = None) -> None:
        """Switch the miss policy; takes effect at the next token."""
        self._require_open()
        threshold = self.runtime.skip_threshold if skip_threshold is None else skip_threshold
        _check_policy(policy, self.device, threshold, self.row_path)
        with self.runtime.lock:
            if self.runtime.pinned and policy != "substitute":
                raise PolicyError("release the pinned committee (pin_committee(None)) before leaving substitute")
            self.runtime.policy, self.runtime.skip_threshold = policy, threshold

    def follow_free_memory(self, enabled: bool, margin_bytes: int | None = None) -> None:
        """Let the budget track free RAM (CPU) or VRAM (CUDA), keeping ``margin_bytes`` free."""
        self._require_open()
        self.budget.follow_margin = margin_bytes if margin_bytes is not None else self.budget.default_margin()
        self.watcher.following = enabled

    def residency(self) -> ResidencySnapshot:
        """The resident experts and importance of every MoE layer, taken consistently under the step lock."""
        with self.runtime.lock:
            cs = self.committees
            # one device read for every layer's counters (this runs after each token while the GUI listens)
            flat = torch.cat([t for c in cs for t in (c.cache.routed, c.cache.last_token)]).tolist()
            routed, last = {}, {}
            for c in cs:
                routed[c.layer], flat = flat[: c.num_experts], flat[c.num_experts :]
                last[c.layer], flat = sorted(e for e in flat[: c.top_k] if e >= 0), flat[c.top_k :]
            return ResidencySnapshot(
                resident={c.layer: sorted(c.resident_experts) for c in cs},
                importance={c.layer: [round(float(v), 6) for v in c.cache.scores()] for c in cs},
                capacity={c.layer: c.capacity for c in cs},
                routed=routed,
                last_token=last,
            )

    def stats(self) -> EngineStats:
        counts = totals(self.runtime.counters, [m.routing for m in self.committees])  # one device read
        return EngineStats(
            budget_bytes=self.budget_bytes,
            total_expert_bytes=self.total_expert_bytes,
            minimum_budget_bytes=self.minimum_budget_bytes,
            resident_expert_bytes=self.resident_expert_bytes(),
            peak_resident_expert_bytes=self._peak_resident,
            expert_loads=counts.loads,
            bytes_loaded=counts.bytes_loaded,
            hits=counts.hits,
            misses=counts.misses,
            skipped=counts.skipped,
            substituted=counts.substituted,
            cpu_computed=counts.cpu_computed,
            low_precision=counts.low_precision,
            background_swaps=counts.background_swaps,
            tokens_generated=self.decoder.last.tokens,
            tokens_per_s=self.decoder.last.tokens_per_s,
            time_to_first_token_s=self.decoder.last.time_to_first_token_s,
            peak_rss_bytes=peak_rss_bytes(),
        )

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the background threads, release file handles and give every weight, slot, cache and graph back
        now, not when the object is collected: the app loading a second model, and benchmarks building engines
        in turn, still hold this one. Safe to call twice."""
        self.decoder.close()
        self.watcher.stop()
        self.swapper.stop()
        with self.runtime.lock:
            self.graphed = self.compact = None  # the graphs, their memory pool, the KV cache, the fused weights
            for committee in self.committees:
                committee.release()
            self.store.release()
            self.copier.release()
            self.model.to_empty(device="meta")  # the skeleton keeps its shapes and gives its memory back
            for module in self.model.modules():
                if isinstance(module, PackedLinear):  # its packed weight is a plain attribute, not a parameter
                    module.weight = torch.empty(0, device="meta")
            gc.collect()  # the engine's parts refer to each other: collect them now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.store.checkpoint.close()

    # ---- internals ---------------------------------------------------------------------------
    def _new_session(self, tokens: int) -> Session:
        """A KV cache for ``tokens`` positions (at most the context), on the compact step if the family has one."""
        if self.compact is None:
            return TransformersSession(self.model)
        context = self.decoder.context
        return CompactSession(self.compact, min(tokens, context) if context else tokens, self.graphed)

    def _before_step(self, is_prefill: bool) -> None:
        """Runs under the step lock before each forward: budget changes land here, between tokens."""
        self.budget.apply_pending()
        # substitute and cpu keep the prompt exact (loading what it needs) and never load while decoding
        self.runtime.allow_loads = not self.runtime.pinned and (is_prefill or self.runtime.loads_on_miss)
        if self.runtime.trace is not None:
            self.runtime.trace.begin()

    def _after_step(self, is_prefill: bool) -> None:
        """Runs under the step lock after each forward that succeeded."""
        if self.runtime.trace is not None:
            self.runtime.trace.end(is_prefill)

    def _after_token(self, count: int) -> None:
        self._peak_resident = max(self._peak_resident, self.resident_expert_bytes())
        self.swapper.wake()
        if not self.telemetry.active:  # nobody listens: skip the device sync and the snapshot
            return
        stats = self.stats()
        self.telemetry.emit(TokenStats(tokens=count, tokens_per_s=stats.tokens_per_s, hit_rate=stats.hit_rate,
                                       expert_loads=stats.expert_loads, skipped=stats.skipped,
                                       substituted=stats.substituted, cpu_computed=stats.cpu_computed))
        self.telemetry.emit(self.residency())

    def memory_sample(self) -> MemorySample:
        cuda = self.device.type == "cuda"
        return MemorySample(
            rss_bytes=current_rss_bytes(),
            available_ram_bytes=int(psutil.virtual_memory().available),
            cuda_allocated_bytes=torch.cuda.memory_allocated(self.device) if cuda else 0,
            cuda_reserved_bytes=torch.cuda.memory_reserved(self.device) if cuda else 0,
            cuda_free_bytes=int(torch.cuda.mem_get_info(self.device)[0]) if cuda else 0,
            budget_bytes=self.budget_bytes,
            resident_expert_bytes=self.resident_expert_bytes(),
        )

    def _emit_memory_sample(self) -> None:
        if self.telemetry.active:
            self.telemetry.emit(self.memory_sample())

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def _require_open(self) -> None:
        """A closed engine has given its memory back: what would move experts again is refused."""
        if self.decoder.closed:
            raise EngineClosedError("this engine is closed: load the model again")

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ModelFormatError("this model folder has no tokenizer; text prompts need one")
        return self.tokenizer


@atexit.register
def _close_live_engines() -> None:
    """Background threads must not be inside torch when the interpreter tears down."""
    for engine in list(_LIVE):
        engine.close()


def _guess_next(recorder: TraceRecorder, following: nn.Module, layer: int,
                k: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], object], None]:
    """A router hook: the next MoE layer's router on this layer's input, the prefetch predictor's guess."""
    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: object) -> None:
        out = following.forward(inputs[0])  # forward, not __call__: the next router's own hooks stay quiet
        logits = out[0] if isinstance(out, tuple) else out
        if logits.is_floating_point():  # a router that returns ids first gives no guess
            recorder.note_guess(layer, logits.topk(k, dim=-1).indices.reshape(-1, k))

    return hook


def _check_policy(policy: str, device: torch.device, skip_threshold: float, rows: bool = True) -> None:
    """``rows``: every layer's experts run on the per-expert row path (what ``lowbit`` computes misses with)."""
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    if policy == "cpu" and device.type != "cuda":  # the rules Engine.policies publishes
        raise PolicyError("policy cpu computes misses on the CPU while the GPU works: it needs --device cuda")
    if policy == "lowbit" and not rows:
        raise PolicyError("policy lowbit is not supported for this model's experts yet")
    if not 0.0 <= skip_threshold < 1.0:
        raise PolicyError(f"skip threshold must be in [0, 1), got {skip_threshold}")


def _check_text(text: str) -> None:
    """Text from argv or a pipe may hold undecodable bytes (as surrogates); the tokenizer would crash on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError("the text is not valid UTF-8") from None


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # a malformed tokenizer file surfaces as any of a dozen exception types
        raise ModelFormatError(f"cannot read the tokenizer in {folder}: {exc}".splitlines()[0]) from exc
