"""Per-route request accounting: counts, in-flight, longest handler step, and their metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.metrics import Metrics


@dataclass(slots=True)
class RouteRecord:
    count: int = 0
    errors: int = 0
    in_flight: int = 0
    max_step_ms: float = 0.0
    last_step_ms: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "max_step_ms": round(self.max_step_ms, 3),
            "last_step_ms": round(self.last_step_ms, 3),
        }


class RouteStats:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.by_route: dict[str, RouteRecord] = {}
        self.in_flight = 0
        self.total = 0
        # labelled children cached: `.labels()` takes a lock and builds a key on every call
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def enter(self, route: str) -> RouteRecord:
        record = self.by_route.get(route)
        if record is None:
            record = self.by_route[route] = RouteRecord()
        record.in_flight += 1
        self.in_flight += 1
        return record

    def leave(
        self, record: RouteRecord, route: str, status: int, duration: float, step: float
    ) -> None:
        self.in_flight -= 1
        self.total += 1
        record.in_flight -= 1
        record.count += 1
        if status >= 500:
            record.errors += 1
        step_ms = step * 1000.0
        record.last_step_ms = step_ms
        if step_ms > record.max_step_ms:
            record.max_step_ms = step_ms
        children = self._children.get((route, status))
        if children is None:
            m = self._metrics
            children = self._children[(route, status)] = (
                m.requests.labels(route=route, status=str(status)),
                m.duration.labels(route=route),
                m.handler_step.labels(route=route),
            )
        requests, duration_hist, step_hist = children
        requests.inc()
        duration_hist.observe(duration)
        step_hist.observe(step)

    def in_flight_by_route(self) -> dict[str, int]:
        # called from the watchdog thread: copy first, the loop may add routes meanwhile
        return {r: rec.in_flight for r, rec in list(self.by_route.items()) if rec.in_flight}

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        return {route: rec.as_dict() for route, rec in sorted(self.by_route.items())}

    def longest_step(self) -> tuple[str, float] | None:
        """The route with the longest step seen so far, and that step in ms."""
        if not self.by_route:
            return None
        route, rec = max(self.by_route.items(), key=lambda item: item[1].max_step_ms)
        return route, rec.max_step_ms
