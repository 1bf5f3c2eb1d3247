"""The GUI's one door to the engine: loads, replies and telemetry as Qt signals, never blocking the GUI.

Blocking work (building the default model, loading, generating) runs on worker threads through
asyncio (qasync's loop is Qt's loop); telemetry is drained on a timer and re-emitted as typed signals.
The engine may be a local one or a remote server (``connect_server``): both are an ``EngineLike``, and the window
reads them only through this session. A local engine can also be served over the OpenAI API (``serve``) while
the window uses it. A new subscription starts with the committees as they are (a local engine queues them at
once, a server sends them with its first poll), so the expert map fills at the first ``drain``.
"""

from __future__ import annotations

import gc
import ipaddress
import socket
import threading
import urllib.parse
from collections.abc import Sequence

from PySide6.QtCore import QObject, QTimer, Signal

from expertswap.app.ops import describe, run_op
from expertswap.client import RemoteEngine, RemoteError, api_root
from expertswap.engine import Engine, default_device, dropped_notice, fit_history
from expertswap.models import cache_root, resolve_model
from expertswap.protocol import (
    POLICIES,
    BudgetChange,
    EngineLike,
    EngineStats,
    ExpertSwapError,
    MemorySample,
    PackProgress,
    ResidencySnapshot,
    SamplingSettings,
    Subscription,
    SwapEvent,
    TokenStats,
)
from expertswap.server import BackgroundServer

DRAIN_MS = 100
_NEWEST_ONLY = (ResidencySnapshot, TokenStats)


class EngineSession(QObject):
    """Owns at most one Engine; every state change is announced by a signal."""

    build_progress = Signal(str, int, int)
    load_failed = Signal(str)  # why, in words ("": the user cancelled the build)
    reply_chunk = Signal(str)
    reply_finished = Signal(str)  # "done" | "length" | "stopped" | an error in words
    swaps = Signal(list)  # one frame's SwapEvents, oldest first
    residency = Signal(object)
    token_stats = Signal(object)
    memory = Signal(object)
    budget = Signal(object)
    packing = Signal(object)  # PackProgress: the packed expert file being written (quantised experts)
    problem = Signal(str)  # a background request to a remote engine failed, in words
    trimmed = Signal(str)  # which oldest turns were left out of a reply's prompt, in words (``dropped_notice``)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.engine: EngineLike | None = None
        self.server: BackgroundServer | None = None
        self.device = default_device()  # where models load: a GPU when there is one
        self._stopping = False
        self._cancel_build = threading.Event()
        self._subscription: Subscription | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(DRAIN_MS)
        self._timer.timeout.connect(self.drain)
        self._signals = {ResidencySnapshot: self.residency, TokenStats: self.token_stats, MemorySample: self.memory,
                         BudgetChange: self.budget, PackProgress: self.packing}

    async def load(self, model: str, budget: str, policy: str = POLICIES[0],
                   quantize: str | None = None) -> bool:
        """Build (if "default") and load ``model``; on any failure the old engine stays and ``load_failed`` says why."""

        cancel = self._cancel_build = threading.Event()

        def progress(stage: str, done: int, total: int) -> None:
            if cancel.is_set():  # on the loading thread: the build stops here, its partial folder is swept later
                raise BuildCancelled("the default model's build was cancelled")
            self.build_progress.emit(stage, done, total)

        def work() -> Engine:
            return Engine.load(resolve_model(model, progress), budget, self.device, policy, quantize=quantize,
                               pack_root=cache_root() / "packed")

        def failed(exc: BaseException) -> None:
            self.load_failed.emit("" if isinstance(exc, BuildCancelled) else describe(exc))

        # Collect unreachable Qt wrappers (closed dialogs, menus) here, on the GUI thread: left to the loading
        # thread's garbage collection, their C++ deletion there deadlocked against a paint event on the GUI
        # thread (it held the GIL and waited for a QObject mutex the loader held while waiting for the GIL).
        gc.collect()
        return await run_op(None, work).success(self._adopt).failure(failed).run()

    def cancel_build(self) -> None:
        """Stop the default model's build in progress (the load then fails with no message)."""
        self._cancel_build.set()

    async def connect_server(self, url: str, api_key: str | None = None) -> bool:
        """Chat through the OpenAI-compatible server at ``url``; on failure the old engine stays (``load_failed``).

        The switch comes only once the server has answered all that adopting it reads, and this window's own
        server is refused: adopting it would close the engine it serves, leaving the window talking to nothing.
        """
        serving = self.server

        def work() -> RemoteEngine:
            if serving is not None and _names(url, serving):
                raise RemoteError(f"{url} is this window's own server (Model > Serve over the OpenAI API): connect "
                                  "to it from another program, or stop serving and load a model")
            return RemoteEngine.connect(url, api_key or None)

        failed = lambda exc: self.load_failed.emit(describe(exc))  # noqa: E731
        return await run_op(None, work).success(self._adopt).failure(failed).run()

    def _adopt(self, engine: EngineLike) -> None:
        """Close the old engine for the new one; its first residency is the subscription's first event."""
        self.close()
        self.engine = engine
        self._subscription = engine.subscribe()
        self._timer.start()

    # ---- what the window reads of the engine ---------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """A model is loaded or a server connected."""
        return self.engine is not None

    @property
    def is_local(self) -> bool:
        """The engine runs in this process: it can be served, follow free memory, and reopen at the next start."""
        return isinstance(self.engine, Engine)

    @property
    def remote(self) -> RemoteEngine | None:
        return self.engine if isinstance(self.engine, RemoteEngine) else None

    @property
    def remote_model(self) -> str:
        """The model the connected server names ("" for a local engine)."""
        return self.remote.model if self.remote is not None else ""

    @property
    def panels_unavailable(self) -> str:
        """Why the budget and expert panels cannot follow this engine ("" when they can)."""
        return self.remote.unavailable if self.remote is not None else ""

    @property
    def engine_device(self) -> str:
        """Where the engine computes its experts, in words (a server's device says which server)."""
        return str(self._loaded.device)

    @property
    def quantize(self) -> str | None:
        """How the experts were quantised when read (nf4, ...), or None."""
        return self._loaded.quantize

    @property
    def native_format(self) -> str | None:
        """The packed format the checkpoint ships its experts in (fp8, mxfp4), or None."""
        return self._loaded.native_format

    @property
    def total_experts(self) -> int:
        return self._loaded.total_experts

    @property
    def policies(self) -> tuple[str, ...]:
        return self._loaded.policies

    @property
    def policy(self) -> str:
        """The miss policy in force (a server's: as of its last poll)."""
        return self._loaded.policy

    def committee_size(self, budget_bytes: int) -> int:
        """Experts the engine's planner keeps resident at ``budget_bytes``, all MoE layers together."""
        return self._loaded.committee_size(budget_bytes)

    def stats(self) -> EngineStats:
        """Budget and counts, read in one go (a server's: as of its last poll)."""
        return self._loaded.stats()

    @property
    def _loaded(self) -> EngineLike:
        if self.engine is None:
            raise ExpertSwapError("no model is loaded")
        return self.engine

    def serve(self, name: str, port: int = 8000) -> str:
        """Serve the local engine over the OpenAI API on loopback (``port``, or a free one if it is taken);
        returns the URL. Raises ``ExpertSwapError`` without a local engine."""
        if not isinstance(self.engine, Engine):
            raise ExpertSwapError("serving needs a model loaded on this machine")
        self.stop_serving()
        try:
            self.server = BackgroundServer(self.engine, name, port=port)
        except OSError:
            self.server = BackgroundServer(self.engine, name, port=0)
        return self.server.url

    def stop_serving(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    async def reply(self, messages: Sequence[dict[str, str]], settings: SamplingSettings) -> str:
        """Stream a reply into ``reply_chunk``; returns how it ended ("done", "stopped" or the error in words).

        Every failure, typed or not, ends here as words: nothing escapes to the event loop.
        """
        outcome = "done"
        self._stopping = False
        try:
            engine = self._loaded
            messages = self._fit(messages, settings.max_new_tokens)
            async for chunk in engine.stream_chat(messages, settings):
                self.reply_chunk.emit(chunk.text)
        except Exception as exc:
            outcome = describe(exc)
        if outcome == "done" and self._stopping:
            outcome = "stopped"
        elif outcome == "done" and engine.last_finish == "length":
            outcome = "length"  # the token limit or the context ended it
        self.drain()
        self.reply_finished.emit(outcome)
        return outcome

    def _fit(self, messages: Sequence[dict[str, str]], reserve: int) -> list[dict[str, str]]:
        """For a local engine, the newest turns that leave ``reserve`` tokens of its context for the reply (``trimmed``
        says how many went; the engine stops a reply at the context). A remote engine's tokenizer is not here: the
        server gets the whole conversation (ExpertSwap's refuses one longer than its context, in words)."""
        if not isinstance(self.engine, Engine):
            return list(messages)
        context = self.engine.context_tokens
        fitted = fit_history(messages, self.engine.encode_chat, context, reserve)
        if fitted.dropped:
            self.trimmed.emit(dropped_notice(fitted.dropped, context))
        return fitted.messages

    def stop(self) -> None:
        self._stopping = True
        if self.engine is not None:
            self.engine.cancel()

    def set_budget(self, budget_bytes: int) -> None:
        """In force before the next token; a remote engine is asked off the GUI thread (a failure: ``problem``)."""
        if self.remote is not None:
            remote = self.remote

            def failed(exc: BaseException) -> None:
                if self.remote is remote:  # not a server left since (its closing cut the request)
                    self.problem.emit(describe(exc))

            run_op(None, lambda: remote.set_budget(int(budget_bytes))).failure(failed).start()
        elif self.engine is not None:
            self.engine.set_budget(int(budget_bytes))

    def set_policy(self, policy: str, skip_threshold: float = 0.0) -> str:
        """Switch policy; returns the engine's refusal in words, or "" when it took effect."""
        if self.engine is None or self.panels_unavailable:
            return ""
        try:
            self.engine.set_policy(policy, skip_threshold)
        except ExpertSwapError as exc:
            return str(exc)
        return ""

    def follow_free_memory(self, enabled: bool) -> None:
        if isinstance(self.engine, Engine):  # a remote engine follows its own machine's memory, not ours
            self.engine.follow_free_memory(enabled)

    def drain(self) -> None:
        """Re-emit a frame's queued telemetry on the GUI thread, in order: the frame's swaps as lists (``swaps``),
        of its residency snapshots and token stats only the newest (each holds what came before it), the rest
        one signal each. Per event, a long reply's hundreds of swaps a second kept the GUI thread busy and the
        decoder waiting for the interpreter."""
        if self._subscription is None:
            return
        events = self._subscription.drain()
        newest = {kind: i for i, event in enumerate(events) if (kind := type(event)) in _NEWEST_ONLY}
        swaps: list[SwapEvent] = []
        for i, event in enumerate(events):
            kind = type(event)
            if isinstance(event, SwapEvent):
                swaps.append(event)
                continue
            if kind in _NEWEST_ONLY and newest[kind] != i:
                continue
            if swaps and kind is ResidencySnapshot:  # swaps before a snapshot land before it
                self.swaps.emit(swaps)
                swaps = []
            signal = self._signals.get(kind)
            if signal is not None:
                signal.emit(event)
        if swaps:
            self.swaps.emit(swaps)

    def close(self) -> None:
        self._timer.stop()
        self.stop_serving()
        if self._subscription is not None:
            self._subscription.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self._subscription = None


class BuildCancelled(ExpertSwapError):
    """The user cancelled the default model's build."""


def _names(url: str, server: BackgroundServer) -> bool:
    """Whether ``url`` reaches ``server``'s socket, however its address is spelled (localhost, 127.0.0.1, ...)."""
    parts = urllib.parse.urlsplit(api_root(url))
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError):  # a bad port or an unknown name is not this machine: connecting says why
        return False
    own = ipaddress.ip_address(server.host)
    return port == server.port and any(ipaddress.ip_address(str(info[4][0]).split("%")[0]) == own for info in found)
