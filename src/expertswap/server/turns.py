"""The engine answers one request at a time: the others wait their turn here, in order, in a bounded queue."""

from __future__ import annotations

import asyncio

from .errors import APIError

QUEUE = 8  # requests that may wait for the engine before the next one is refused


class Turns:
    """One reply at a time, the rest waiting in order, at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size, self.waiting = size, 0
        self.lock = asyncio.Lock()

    async def take(self) -> None:
        """Wait for the engine; a full queue is refused at once (429, retry shortly)."""
        if self.lock.locked() and self.waiting >= self.size:
            raise APIError(429, "the server is busy: try again shortly", "rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    def give_back(self) -> None:
        self.lock.release()
