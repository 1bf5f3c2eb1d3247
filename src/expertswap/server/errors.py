"""Every answer that is not a reply, in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``,
or Anthropic's (``{"type": "error", "error": {"type", "message"}}``) under ``/v1/messages``.

FastAPI's own answers (``{"detail": ...}`` for a 404, a 405 or a body it cannot parse) and any exception a route
lets out are turned into it here, so that a client always gets an error it can read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from expertswap.protocol import EngineBusyError, ExpertSwapError, PromptError, SettingsError

log = logging.getLogger("expertswap.server")


ANTHROPIC_PATH = "/v1/messages"
ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_path(path: str) -> bool:
    """A path of Anthropic's API, whose errors take Anthropic's shape."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


class APIError(Exception):
    """An error to answer in OpenAI's shape: ``kind`` is its ``type``, ``param`` the request field at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = ANTHROPIC_KINDS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        message = f"{self.param}: {self.message}" if self.param and not self.message.startswith(self.param) \
            else self.message
        return {"type": "error", "error": {"type": kind, "message": message}}

    def response(self, path: str = "") -> JSONResponse:
        """The answer, in the shape of the API ``path`` belongs to."""
        body = self.anthropic_body() if anthropic_path(path) else self.body()
        return JSONResponse(body, self.status, headers=self.headers)


def from_exception(exc: Exception) -> APIError:
    """What an exception from the engine (or a bug) is answered with: a busy engine is a 503 to retry, a prompt or
    settings the engine refuses a 400 (the request's fault), another engine error a 500 with its message (meant for
    the user), anything else a 500 that names it and is logged."""
    if isinstance(exc, EngineBusyError):  # the app that serves this engine is answering in its own window
        return APIError(503, str(exc), "server_busy", headers={"Retry-After": "1"})
    if isinstance(exc, (PromptError, SettingsError)):  # e.g. a prompt of no tokens, a sampling setting out of range
        return APIError(400, str(exc))
    if isinstance(exc, ExpertSwapError):
        return APIError(500, str(exc), "server_error")
    log.error("the server failed on a request", exc_info=exc)
    return APIError(500, f"the server failed on this request: {type(exc).__name__}: {exc}", "server_error")


class ServerErrors:
    """ASGI middleware: an exception that escapes a route is answered as a JSON 500 on a connection kept open.

    Starlette's own 500 handler answers in plain text and re-raises, and uvicorn then drops the keep-alive
    connection, so that the client's next request on it fails too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if scope["type"] != "http" or started:  # a stream ends its own errors with an error event
                raise
            await from_exception(exc).response(scope.get("path", ""))(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    """A body that is not JSON, or a field out of range: ``param`` names the field, never a character offset."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}")
    field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # after where: body, query, path
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"{field}: this server does not implement this field", param=field)
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return APIError(400, f"{field or 'request'}: {message}", param=field)


def _http_error(request: Request, exc: HTTPException) -> APIError:
    """Starlette's own refusals: no such path, a method the path does not take, a body it could not parse."""
    where = f"{request.method} {request.url.path}"
    message = {404: f"no such endpoint: {where}", 405: f"method not allowed: {where}"}.get(exc.status_code)
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's parse error: not UTF-8, nested too deep
        message = f"the body could not be parsed as JSON: {exc.__cause__}"
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return APIError(exc.status_code, message or str(exc.detail), kind, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Answer ``APIError``, FastAPI's validation errors and Starlette's HTTP errors in OpenAI's shape (what escapes
    them is ``ServerErrors``' to answer)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response(request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _http_error(request, exc).response(request.url.path)
