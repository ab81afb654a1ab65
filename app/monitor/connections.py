"""Counts the server's real TCP connections (not requests): open now, peak, accepted in total.

aiohttp's `web.Server` is told of every connection its protocol makes and loses; we wrap those two
calls on the instance the runner built, so counting costs two set operations per connection and
needs no private attribute.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class ConnectionTracker:
    def __init__(self) -> None:
        self._live: set[int] = set()
        self.peak = 0
        self.accepted_total = 0

    @property
    def open(self) -> int:
        return len(self._live)

    def attach(self, server: web.Server) -> None:
        """Start counting the connections of `server` (call once, after `runner.setup()`)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._live.add(id(handler))
            self.accepted_total += 1
            if len(self._live) > self.peak:
                self.peak = len(self._live)

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            self._live.discard(id(handler))
            lost(handler, exc)

        # instance attributes shadow the methods RequestHandler calls on its manager
        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]

    def as_dict(self) -> dict[str, int]:
        return {"open": self.open, "peak": self.peak, "accepted_total": self.accepted_total}
