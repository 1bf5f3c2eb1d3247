"""The engine's public face: load a model under a budget, stream replies, report stats."""

from __future__ import annotations

import atexit
import contextlib
import gc
import threading
import weakref
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from expertswap.engine.decode import chat_template
from expertswap.engine.decode.compact_step import CompactModel
from expertswap.engine.decode.decoder import ReplyStats, TokenChunk, TokenScores
from expertswap.engine.decode.generation import IncrementalDecoder
from expertswap.engine.decode.graphed_step import GraphedDecode
from expertswap.engine.decode.history import Message
from expertswap.engine.loader import Parts, build
from expertswap.engine.moe.policies import available_policies, choose_policy
from expertswap.engine.moe.residency import residency, resident_bytes
from expertswap.engine.observe.memory import peak_rss_bytes
from expertswap.engine.observe.trace import TraceHeader, TraceRecorder, hook_router_guesses
from expertswap.engine.weights.packed import PackedLinear
from expertswap.protocol.errors import (
    BudgetError,
    EngineBusyError,
    EngineClosedError,
    ModelFormatError,
    PromptError,
)
from expertswap.protocol.events import ResidencySnapshot, Subscription
from expertswap.protocol.options import DEFAULT_EVICTION
from expertswap.protocol.plan import LayerShape, committee_size
from expertswap.protocol.sampling import SamplingSettings
from expertswap.protocol.stats import EngineStats

_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """A MoE model whose experts live in per-layer committees sized by a byte budget."""

    def __init__(self, parts: Parts) -> None:
        """An engine over built parts (``Engine.load`` builds them and starts the threads)."""
        self.model = parts.model
        self.tokenizer = parts.tokenizer
        self.family = parts.family
        self.committees = parts.committees
        self.routers = parts.routers
        self.row_path = parts.row_path
        self.store = parts.store
        self.runtime = parts.runtime
        self.telemetry = parts.runtime.telemetry
        self.copier = parts.copier
        self.budget = parts.budget
        self.swapper = parts.swapper
        self.watcher = parts.watcher
        self.reporter = parts.reporter
        self.sessions = parts.sessions
        self.guard = parts.guard
        self.decoder = parts.decoder
        self.packer = parts.packer
        self.device = self.model.device

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
        dense: str | None = None,
        pack_root: str | Path | None = None,
    ) -> Engine:
        """Load ``model_dir`` with only a budget's worth of experts resident on ``device``.

        ``quantize`` (one of ``QUANTIZATIONS``: int8, int4 in groups of 32/64/128, nf4, fp4) quantises every expert
        when it is read: the budget then counts quantised bytes, and the output is the quantised model's, not the
        original's. ``dense="int8"`` (on the CPU, beside quantised experts) also quantises the weights outside the
        experts (attention, dense and shared MLPs, the output layer), as llama.cpp's Q8_0 does. With quantised
        experts and a ``pack_root`` (the front ends give their cache's ``packed`` folder), the packed experts are
        written there once, in the background, and misses read them (``weights/packed_file.py``).
        """
        engine = cls(build(model_dir, budget, device, policy, ram_tier, dtype, skip_threshold, swapper, eviction,
                           quantize, dense, Path(pack_root) if pack_root is not None else None))
        try:
            engine.swapper.start()
            engine.watcher.start()
            if engine.packer is not None:
                engine.packer.start()
        except BaseException:  # no thread to be had: give the memory and the files back
            engine.close()
            raise
        _LIVE.add(engine)
        return engine

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
        return self.runtime.policy.name

    @property
    def compact(self) -> CompactModel | None:
        """The compact forward, for the families that have one (None: transformers' own, or closed)."""
        return self.sessions.compact

    @property
    def graphed(self) -> GraphedDecode | None:
        """The CUDA-graph decode step, on a GPU with the compact forward."""
        return self.sessions.graphed

    @property
    def context_tokens(self) -> int | None:
        """The model's context length, when its config gives one."""
        return self.sessions.context

    @property
    def quantize(self) -> str | None:
        """How the experts were quantised when read (``QUANTIZATIONS``), or None: as stored."""
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
        return available_policies(self.device.type, self.row_path)

    @property
    def layer_shapes(self) -> list[LayerShape]:
        """Each MoE layer's shape, as the planner sizes its committee."""
        return [c.shape for c in self.committees]

    def committee_size(self, budget_bytes: int) -> int:
        """How many experts (all MoE layers together) the planner keeps resident at ``budget_bytes``."""
        return committee_size(budget_bytes, self.layer_shapes)

    def resident_expert_bytes(self) -> int:
        """Bytes held by every committee's slot tensors right now."""
        return resident_bytes(self.committees)

    # ---- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return list(self._require_tokenizer()(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
                    ) -> list[int]:
        """Token ids of a conversation wrapped in the tokenizer's chat template, ready for the reply; ``tools``
        (OpenAI's function objects) go to a template that renders them (``speaks_tools``)."""
        tokenizer = self._require_tokenizer()
        for message in messages:
            _check_text(message.get("content") or "")
        if not getattr(tokenizer, "chat_template", None):
            raise ModelFormatError("this model's tokenizer has no chat template; use plain prompts")
        text = chat_template.render(tokenizer, messages, tools=tools)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (None without one): whether it renders tools is the server's question."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._require_tokenizer().decode(list(ids), skip_special_tokens=True))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text, special tokens included (what a log-probability is reported against)."""
        tokenizer = self._require_tokenizer()
        return [str(tokenizer.decode([token], skip_special_tokens=False)) for token in ids]

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes: a token that holds part of a character (an emoji in pieces) has its part, which
        its text alone cannot say (OpenAI's logprob ``bytes``)."""
        return token_bytes(self._require_tokenizer(), ids)

    def check_settings(self, settings: SamplingSettings) -> None:
        """Raise the ``SettingsError`` a reply with ``settings`` would (a bias past the vocabulary, a grammar
        that cannot be used), before one starts."""
        self.decoder.check(settings)

    @property
    def stop_ids(self) -> frozenset[int]:
        """The tokens that end a reply (the model's end of turn)."""
        return frozenset(self.decoder.stop_ids)

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this, less one: the rows of the model's logits."""
        return self.decoder.vocab

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
        return self.decoder.score(input_ids, chunk, prompt)

    def pin_committee(self, experts: dict[int, Sequence[int]] | None) -> None:
        """Hold these experts in each listed layer and stop all loading: a static committee (None releases).

        Only with the ``substitute`` policy: while pinned nothing is loaded, prompts included, and every
        miss goes to a resident expert. It is what a never-swapped committee costs, kept measurable.
        """
        self._require_open()
        with self.runtime.lock:
            if experts is None:
                self.runtime.pin(False)
                return
            self.runtime.pin(True, check_only=True)
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
            self.runtime.pin(True)

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

    def forget_kept_caches(self) -> None:
        """Drop every conversation's kept KV cache: the next prompt runs whole. For measuring a prefill, or a
        replay that must route every prompt token; a chat never needs it."""
        self.decoder.prefixes.clear()

    @property
    def last_finish(self) -> str:
        """How the latest reply ended: "stop", "length" (the token limit or the context) or "cancelled"."""
        return self.decoder.last.finish

    @property
    def last_reply(self) -> ReplyStats:
        """The latest reply's pace and how much of its prompt came from a kept cache (no device read)."""
        return self.decoder.last

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
            try:
                self.runtime.attach_trace(recorder)
            except EngineBusyError:
                recorder.close()
                raise
        hooks = hook_router_guesses(recorder, self.routers, header.layers, header.top_k)
        try:
            yield recorder
        finally:
            for hook in hooks:
                hook.remove()
            with self.runtime.lock:
                self.runtime.attach_trace(None)
            recorder.close()

    # ---- live committee -----------------------------------------------------------------------
    def subscribe(self, maxsize: int = 100_000, every_token: bool = False) -> Subscription:
        """A queue of every telemetry event from now on, the committees as they are first; ``drain()`` it from any
        thread. Under the step lock, so no swap falls between the snapshot and the events that follow it.

        A reply's token stats and committee snapshots come at most every 100 ms (and at its first and last token),
        which is what a window draws; ``every_token`` asks for them after each token (a log of the reply)."""
        with self.runtime.lock:
            subscription = self.telemetry.subscribe(maxsize, every_token)
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
        threshold = self.runtime.policy.skip_threshold if skip_threshold is None else skip_threshold
        chosen = choose_policy(policy, self.device.type, threshold, self.row_path)
        with self.runtime.lock:
            self.runtime.switch_policy(chosen)

    def follow_free_memory(self, enabled: bool, margin_bytes: int | None = None) -> None:
        """Let the budget track free RAM (CPU) or VRAM (CUDA), keeping ``margin_bytes`` free."""
        self._require_open()
        self.budget.follow_margin = margin_bytes if margin_bytes is not None else self.budget.default_margin()
        self.watcher.following = enabled

    def residency(self) -> ResidencySnapshot:
        """The resident experts and importance of every MoE layer, taken consistently under the step lock."""
        with self.runtime.lock:
            return residency(self.committees)

    def stats(self) -> EngineStats:
        counts = self.reporter.counts()  # one device read
        return EngineStats(
            budget_bytes=self.budget_bytes,
            total_expert_bytes=self.total_expert_bytes,
            minimum_budget_bytes=self.minimum_budget_bytes,
            resident_expert_bytes=self.resident_expert_bytes(),
            peak_resident_expert_bytes=self.reporter.peak_resident_bytes,
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
            prompt_tokens=self.last_reply.prompt_tokens,
            cached_prompt_tokens=self.last_reply.cached_prompt_tokens,
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
        if self.packer is not None:
            self.packer.stop()
        with self.runtime.lock:
            self.sessions.release()  # the graphs, their memory pool, the KV cache, the fused weights
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


def token_bytes(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[bytes]:
    """The bytes of each token: byte-level BPE (GPT-2's alphabet) mapped back, SentencePiece's ``<0xNN>`` byte
    pieces as their byte and its ``▁`` as a space, anything else as its UTF-8."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
    out = []
    for piece in tokenizer.convert_ids_to_tokens(list(ids)):
        if byte_level and all(c in _BYTE_OF for c in piece):
            out.append(bytes(_BYTE_OF[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


_BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's byte-level alphabet, inverted


def _check_text(text: str) -> None:
    """Text from argv or a pipe may hold undecodable bytes (as surrogates); the tokenizer would crash on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError("the text is not valid UTF-8") from None
