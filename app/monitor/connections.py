"""Counts the server's real TCP connections (not requests): open now, peak, accepted in total.

The server's own protocol (app.guard.GuardedConnection, a subclass of aiohttp's RequestHandler)
calls `opened()` and `closed()` from its `connection_made` and `connection_lost`: two integer
updates per connection, nothing per request.
"""

from __future__ import annotations


class ConnectionTracker:
    __slots__ = ("accepted_total", "open", "peak")

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.accepted_total = 0

    def opened(self) -> None:
        self.open += 1
        self.accepted_total += 1
        if self.open > self.peak:
            self.peak = self.open

    def closed(self) -> None:
        self.open -= 1

    def as_dict(self) -> dict[str, int]:
        return {"open": self.open, "peak": self.peak, "accepted_total": self.accepted_total}
