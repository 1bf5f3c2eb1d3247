"""What a request must pass before any route sees it: who may ask, and how much it may send.

Without an API key the server trusts only this machine, and a web page the user opens is on this machine too: a
page whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name as ``Host``, and any page sends its
``Origin``. So only loopback ``Host`` values and loopback origins are let in. With an API key, the key is the
guard (compared in constant time). The body is read here, at most ``max_body_bytes`` of it, so that no route
parses, or waits on, more than that.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is read


def loopback(host: str) -> bool:
    """``localhost`` or a loopback address (any 127.x, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host(authority: str) -> str | None:
    """The host of ``host[:port]`` or ``[v6][:port]``, or None when it is not of that form."""
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        host, colon, port = authority.partition(":")
        if colon and not port:
            return None
    return host if not port or (port.isascii() and port.isdigit()) else None


def local_host(value: str) -> bool:
    """A ``Host`` header that names this machine: loopback, with or without a port."""
    host = _host(value)
    return host is not None and loopback(host)


def local_origin(value: str) -> bool:
    """An ``Origin`` header of a page served from this machine: ``http(s)://`` a loopback host[:port]."""
    scheme, sep, authority = value.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https") and local_host(authority)


class Guard:
    """ASGI middleware: the Host and Origin check (no API key) or the key, then the body-size limit. Only HTTP
    requests (and the server's lifespan) pass: a websocket is refused."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no route takes a websocket, and one would pass none of the checks below
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # policy violation: the handshake is a 403
            return
        headers = Headers(scope=scope)
        try:
            self._admit(scope, headers)
            body = await self._body(headers, receive)
        except APIError as refused:
            await refused.response(scope["path"])(scope, receive, send)
            return
        if body is not None:  # else the client left while sending it: nobody to answer
            await self.app(scope, _replay(body, receive), send)

    def _admit(self, scope: Scope, headers: Headers) -> None:
        if self.key is None:
            origin = headers.get("origin")
            if not local_host(headers.get("host", "")) or (origin is not None and not local_origin(origin)):
                raise APIError(403, "without an API key this server answers only requests addressed to "
                                    "localhost from pages on localhost (Host and Origin)", "permission_error")
        elif scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
                token = headers.get("x-api-key", "")
            # Starlette reads headers as latin-1: encoded back, they are the bytes the client sent
            if not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)")

    async def _body(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected; a body over the limit is refused, by its
        ``Content-Length`` before a byte is read, or as soon as a chunked one grows past it."""
        too_large = APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                                  "bytes (expertswap serve --max-body-bytes)")
        length = headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise too_large
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then whatever the connection sends (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
