"""A server that speaks OpenAI's chat API, used by the app the way it uses a local engine.

Any such server works for chatting: vLLM, SGLang, llama.cpp's llama-server, LM Studio, Ollama's ``/v1`` and
ExpertSwap's own. ExpertSwap's server also answers ``/v1/expertswap/*``; then the budget, the policy and the
telemetry (swaps, residency, speed, memory) follow the remote engine as they follow a local one. For other
servers ``expertswap`` is False and ``unavailable`` says why the panels are off.

All HTTP runs on one private asyncio loop thread (httpx). Cancelling a reply cancels its task there, which
closes the connection, which makes the server drop the reply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from expertswap.protocol import (
    BudgetError,
    Constraint,
    EngineStats,
    ExpertSwapError,
    PolicyError,
    ResidencySnapshot,
    SamplingSettings,
    SettingsError,
    Subscription,
    Telemetry,
    committee_size,
    wire,
)

T = TypeVar("T")
POLL_S = 0.25  # how often telemetry and figures are fetched from an ExpertSwap server
TIMEOUT_S = 10.0  # connecting and each non-streaming call; a streamed reply may pause longer between tokens
log = logging.getLogger("expertswap.client")
_NO_FIGURES = wire.Figures(EngineStats(**dict.fromkeys((f.name for f in dataclasses.fields(EngineStats)), 0)),
                           policy="", policies=(), device="remote", quantize=None, native_format=None,
                           total_experts=0, resident_experts=0, layers=())


class RemoteError(ExpertSwapError):
    """The server cannot be reached, refused the API key, or answered a request with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the answer, when there was one


@dataclass(frozen=True)
class RemoteChunk:
    """A piece of a streamed reply's text."""

    text: str


def api_root(url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1/`` -> ``http://host:8000/v1/`` (the API's root)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"not an http(s) address: {url or '(empty)'}")
    return (url if url.endswith("/v1") else url + "/v1") + "/"


class RemoteEngine:
    """One connection to an OpenAI-compatible server; ``connect`` makes one (it checks the address and key)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.base_url = api_root(url)
        self._lock = threading.Lock()
        self._closed = False
        self._calls: set[concurrent.futures.Future[Any]] = set()  # blocking calls in flight, cancelled by close()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="expertswap-remote", daemon=True)
        self._thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = self._call(self._client(headers))
        self.model = ""
        self.expertswap = False
        self.unavailable = ""
        self._figures: wire.Figures | None = None
        self._telemetry = Telemetry()  # the server's events, re-emitted here as a local engine emits its own
        self._poller: concurrent.futures.Future[None] | None = None
        self._newcomers: list[Subscription] = []  # subscribed after the poller started: owed a residency
        self._reply: concurrent.futures.Future[None] | None = None
        self.last_finish = ""  # the latest reply's finish_reason: "stop", "length", ... ("": none given)

    @classmethod
    def connect(cls, url: str, api_key: str | None = None) -> RemoteEngine:
        """Reach the server, learn its model and whether it is ExpertSwap's; a ``RemoteError`` says what failed."""
        remote = cls(url, api_key)
        try:
            remote._call(remote._handshake())
        except BaseException:
            remote.close()
            raise
        return remote

    # ---- what the app reads, as a local Engine has it ----------------------------------------------------
    @property
    def figures(self) -> wire.Figures:
        """The server's figures as of the last poll; zeros for a server that is not ExpertSwap's."""
        return self._figures or _NO_FIGURES

    @property
    def device(self) -> str:
        return f"{self.figures.device} at {self.base_url.removesuffix('/v1/')}"

    @property
    def minimum_budget_bytes(self) -> int:
        return self.figures.stats.minimum_budget_bytes

    @property
    def total_expert_bytes(self) -> int:
        return self.figures.stats.total_expert_bytes

    @property
    def budget_bytes(self) -> int:
        return self.figures.stats.budget_bytes

    @property
    def total_experts(self) -> int:
        return self.figures.total_experts

    @property
    def policies(self) -> tuple[str, ...]:
        return self.figures.policies

    @property
    def policy(self) -> str:
        return self.figures.policy

    @property
    def quantize(self) -> str | None:
        return self.figures.quantize

    @property
    def native_format(self) -> str | None:
        return self.figures.native_format

    def committee_size(self, budget_bytes: int) -> int:
        """The remote committee at ``budget_bytes``: the planner's, run here on the layer shapes the server gave."""
        return committee_size(budget_bytes, self.figures.layers)

    def stats(self) -> EngineStats:
        """The server's stats as of the last poll."""
        return self.figures.stats

    def residency(self) -> ResidencySnapshot:
        """The remote committees right now (a blocking call)."""
        self._require_expertswap()
        return _read(wire.residency_from_json, self._call(self._get(wire.RESIDENCY)))

    def set_budget(self, budget: int | str) -> int:
        """Ask the server for a new budget (a blocking call); returns the budget it took, in bytes."""
        self._require_expertswap()
        self._take(self._call(self._post(wire.BUDGET, wire.budget_request(budget), BudgetError)))
        return self.budget_bytes

    def set_policy(self, policy: str, skip_threshold: float = 0.0) -> None:
        self._require_expertswap()
        self._take(self._call(self._post(wire.POLICY, wire.policy_request(policy, skip_threshold), PolicyError)))

    def subscribe(self, maxsize: int = 100_000) -> Subscription:
        """Telemetry from now on, fetched every ``POLL_S`` (nothing arrives from a server that is not ExpertSwap's)."""
        subscription = self._telemetry.subscribe(maxsize)
        with self._lock:
            if self.expertswap and not self._closed:
                if self._poller is None:  # its first page starts with the residency
                    self._poller = self._submit(self._poll())
                else:  # as a local engine's does, it starts from the committees as they are: the next poll
                    self._newcomers.append(subscription)
        return subscription

    async def stream_chat(self, messages: Sequence[dict[str, str]],
                          settings: SamplingSettings = SamplingSettings()) -> AsyncGenerator[RemoteChunk, None]:
        """Stream the server's reply; closing or cancelling the iterator (or ``cancel()``) drops it there too."""
        here = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        def put(item: str | BaseException | None) -> None:
            if not here.is_closed():  # the app's loop ends before a cancelled request's last word
                here.call_soon_threadsafe(pieces.put_nowait, item)

        with self._lock:
            reply = self._reply = self._submit(self._stream(list(messages), settings, put))
        try:
            while (item := await pieces.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield RemoteChunk(item)
        finally:
            reply.cancel()
            with self._lock:
                if self._reply is reply:
                    self._reply = None

    def cancel(self) -> None:
        """Stop the reply in progress; safe from any thread."""
        with self._lock:
            if self._reply is not None:
                self._reply.cancel()

    def close(self) -> None:
        """Drop any reply, the polling and the blocking calls in flight (they raise ``RemoteError``), close the
        connections, end the loop thread. A call made afterwards raises ``RemoteError`` at once."""
        with self._lock:
            self._closed = True
            for future in (self._reply, self._poller, *self._calls):
                if future is not None:
                    future.cancel()
            self._poller = None
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._http.aclose(), self._loop).result(TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(TIMEOUT_S)
        self._loop.close()

    # ---- the private loop --------------------------------------------------------------------------------
    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on the private loop (the caller holds ``_lock``); refused once ``close()`` began, since
        a stopping loop would never run it and its caller would wait for ever."""
        if self._closed:
            coroutine.close()
            raise RemoteError(f"the connection to {self.base_url} is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            future = self._submit(coroutine)
            self._calls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RemoteError(f"the connection to {self.base_url} was closed during the call") from None
        finally:
            with self._lock:
                self._calls.discard(future)

    async def _client(self, headers: dict[str, str]) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(TIMEOUT_S, read=None))

    async def _handshake(self) -> None:
        listed = await self._get("models")
        ids = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict) and m.get("id")]
        if not ids:
            raise RemoteError(f"{self.base_url} lists no models")
        self.model = str(ids[0])
        try:
            self._take(await self._get(wire.STATS))
            self.expertswap = True
        except RemoteError as exc:
            self.unavailable = ("not an ExpertSwap server: it reports no experts" if exc.status == 404 else
                                f"the server's ExpertSwap figures cannot be read ({exc})")

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                       rejected: type[ExpertSwapError] = RemoteError) -> Any:
        try:
            response = await self._http.request(method, path, json=body, timeout=TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach {self.base_url}: {exc or type(exc).__name__}") from None
        if response.status_code >= 400:
            raise _refusal(response, path, rejected)
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{self.base_url}{path} did not answer with JSON") from None

    async def _get(self, path: str) -> Any:
        return await self._request("GET", path)

    async def _post(self, path: str, body: dict[str, Any], rejected: type[ExpertSwapError]) -> Any:
        return await self._request("POST", path, body, rejected)

    async def _stream(self, messages: list[dict[str, str]], settings: SamplingSettings,
                      put: Any) -> None:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                                "top_p": settings.top_p, "repetition_penalty": settings.repetition_penalty}
        if settings.seed is not None:
            body["seed"] = settings.seed
        optional = {"top_k": settings.top_k, "presence_penalty": settings.presence_penalty,
                    "frequency_penalty": settings.frequency_penalty,
                    "logit_bias": {str(t): b for t, b in settings.logit_bias}}
        body.update({name: value for name, value in optional.items() if value})  # OpenAI's servers may not take them
        self.last_finish = ""
        try:
            if settings.constraint is not None:
                body["response_format"] = _response_format(settings.constraint)
            async with self._http.stream("POST", "chat/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _refusal(response, "chat/completions", RemoteError)
                async for line in response.aiter_lines():
                    data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                    if data == "[DONE]":
                        break
                    if data:
                        payload = json.loads(data)
                        for text in _delta_texts(payload):
                            put(text)
                        self.last_finish = _finish(payload) or self.last_finish
        except asyncio.CancelledError:
            raise
        except httpx.HTTPError as exc:
            put(RemoteError(f"the connection to {self.base_url} broke: {exc or type(exc).__name__}"))
        except (ExpertSwapError, ValueError) as exc:
            put(exc if isinstance(exc, ExpertSwapError) else RemoteError(f"unreadable reply from the server: {exc}"))
        finally:
            put(None)

    async def _poll(self) -> None:
        after = -1
        while True:
            try:
                with self._lock:
                    newcomers, self._newcomers = self._newcomers, []
                if newcomers:
                    snapshot = _read(wire.residency_from_json, await self._get(wire.RESIDENCY))
                    for subscription in newcomers:
                        subscription.put(snapshot)
                page = _read(wire.events_from_json, await self._get(f"{wire.EVENTS}?after={after}"))
                after = page.next
                self._take(await self._get(wire.STATS))
                for event in page.events:
                    self._telemetry.emit(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a server restarting or a network blip: keep the last figures, try again
                log.warning("polling %s failed: %s", self.base_url, exc)
            await asyncio.sleep(POLL_S)

    def _take(self, body: Any) -> None:
        self._figures = _read(wire.figures_from_json, body)

    def _require_expertswap(self) -> None:
        if not self.expertswap:
            raise RemoteError(self.unavailable)


def _read(parse: Callable[[dict[str, Any]], T], body: Any) -> T:
    """A ``/v1/expertswap`` answer read by its ``wire`` function; one that is not one is a ``RemoteError``."""
    try:
        if not isinstance(body, dict):
            raise TypeError(f"a JSON {type(body).__name__}, not an object")
        return parse(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteError(f"the server's ExpertSwap answer cannot be read: {exc!r}") from None


def _delta_texts(payload: dict[str, Any]) -> list[str]:
    """The text pieces of one streamed chunk; an in-stream error event becomes a ``RemoteError``."""
    if isinstance(payload.get("error"), dict):
        raise RemoteError(f"the server stopped the reply: {payload['error'].get('message', 'an error')}")
    texts = []
    for choice in payload.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if isinstance(text, str) and text:
            texts.append(text)
    return texts


def _response_format(constraint: Constraint) -> dict[str, Any]:
    """A constraint as OpenAI's ``response_format``; a grammar has no OpenAI form."""
    if constraint.kind == "json":
        return {"type": "json_object"}
    if constraint.kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": json.loads(constraint.text)}}
    raise SettingsError("a grammar cannot be sent to a server: OpenAI's API takes JSON or a JSON schema only")


def _finish(payload: dict[str, Any]) -> str:
    """The chunk's ``finish_reason`` (OpenAI sends it on the last chunk with content), or ""."""
    reasons = [c.get("finish_reason") for c in payload.get("choices") or [] if isinstance(c, dict)]
    return next((r for r in reasons if isinstance(r, str)), "")


def _refusal(response: httpx.Response, path: str, rejected: type[ExpertSwapError]) -> ExpertSwapError:
    """An HTTP error answer as one line: OpenAI's error message when the body has one."""
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
    status = response.status_code
    if status in (401, 403):
        return RemoteError(f"the server refused the API key (HTTP {status}): {message}", status)
    if status in (429, 503):
        return RemoteError(f"the server is busy (HTTP {status}): {message}; try again shortly", status)
    if status == 400 and rejected is not RemoteError:
        return rejected(message)
    return RemoteError(f"HTTP {status} from {path}: {message}", status)
