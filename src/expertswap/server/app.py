"""The OpenAI-compatible HTTP API over one engine (FastAPI), assembled from its parts.

Who may ask and how much it may send is ``guard.py``'s; every error is in OpenAI's JSON shape (``errors.py``);
OpenAI's routes are ``openai_routes.py``'s, Anthropic's (``/v1/messages``) ``anthropic_routes.py``'s, in one queue,
and ExpertSwap's own (``/v1/expertswap/*``) ``expertswap_routes.py``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from expertswap.engine import Engine

from . import anthropic_routes, errors, expertswap_routes, openai_routes
from .guard import MAX_BODY_BYTES, Guard
from .turns import QUEUE, Turns


def create_app(engine: Engine, model: str, api_key: str | None = None, queue: int = QUEUE,
               max_body_bytes: int = MAX_BODY_BYTES, seed: int | None = None) -> FastAPI:
    """The API for ``engine``, which it calls ``model``; ``api_key`` (if given) is required as a Bearer token,
    else only loopback Host and Origin values are answered; bodies over ``max_body_bytes`` are refused; at most
    ``queue`` requests wait for the engine; requests that set no seed are sampled from ``seed``, ``seed`` + 1, ...
    in the order they run (None: each from a fresh random seed)."""
    log = expertswap_routes.EventLog(engine)
    replies = openai_routes.Replies(engine, model, Turns(queue), seed)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        log.close()
        replies.close()

    app = FastAPI(title="ExpertSwap", docs_url=None, redoc_url=None, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(errors.ServerErrors)  # added last, so outermost: the guard's failures are answered too
    app.include_router(openai_routes.router(replies))
    app.include_router(anthropic_routes.router(replies))
    app.include_router(expertswap_routes.router(engine, log))
    return app
