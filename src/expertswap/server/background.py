"""The API served from inside another program (the app's Model > Serve over the OpenAI API): uvicorn on a thread."""

from __future__ import annotations

import socket
import threading
import time

from expertswap.engine import Engine

from .app import create_app
from .guard import MAX_BODY_BYTES
from .turns import QUEUE

START_S = 10.0


class BackgroundServer:
    """``create_app(engine, model)`` on ``host``:``port``, serving from its own thread until ``stop()``.

    The socket is bound here, before the thread starts, so a port already in use is an ``OSError`` for the
    caller (uvicorn would exit the process). ``port`` 0 takes a free one.
    """

    def __init__(self, engine: Engine, model: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, queue: int = QUEUE, max_body_bytes: int = MAX_BODY_BYTES,
                 seed: int | None = None) -> None:
        import uvicorn

        self.engine = engine
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(engine, model, api_key, queue, max_body_bytes, seed), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="expertswap-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_S
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise OSError(f"the API server did not start on {host}:{self.port}")

    @property
    def url(self) -> str:
        """The API's root, as OpenAI clients want it (``.../v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stop(self) -> None:
        """Finish the replies in flight, close the socket, end the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=START_S)
        self.socket.close()
