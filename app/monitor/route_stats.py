"""Per-route request counters: counts by status, in flight, longest step, two histograms.

Every request lands here, so recording is plain arithmetic on the loop thread: a count per status,
the longest and last step, one bucket of each histogram (found with `bisect`) and their sums. The
Prometheus families (`looplab_requests_total{route,status}`, `looplab_request_duration_seconds`,
`looplab_handler_step_seconds`) are built from these figures when /metrics is scraped, on the
loop like the requests, so a scrape never sees a half-made update.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.metrics import DURATION_BUCKETS, STEP_BUCKETS, cumulative_buckets, le_labels


class RouteRecord:
    """One route's figures; its requests count themselves in `in_flight` and `add` their outcome.

    Only what must be counted per request is; totals and errors are summed from the status counts
    when read, which is rare.
    """

    __slots__ = (
        "duration_buckets",
        "duration_sum",
        "in_flight",
        "last_step",
        "max_step",
        "route",
        "statuses",
        "step_buckets",
        "step_sum",
    )

    def __init__(self, route: str) -> None:
        self.route = route
        self.in_flight = 0
        self.max_step = 0.0  # seconds
        self.last_step = 0.0
        self.statuses: dict[int, int] = {}
        # non-cumulative counts; the last slot is +Inf
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.step_buckets = [0] * (len(STEP_BUCKETS) + 1)
        self.step_sum = 0.0

    def add(self, status: int, duration: float, step: float) -> None:
        """Count one answered request: its status, wall time and longest step (seconds)."""
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.last_step = step
        if step > self.max_step:
            self.max_step = step
        # bisect_left: the first bound >= value, i.e. Prometheus' `le` bucket
        self.duration_buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration
        self.step_buckets[bisect_left(STEP_BUCKETS, step)] += 1
        self.step_sum += step

    def add_unprofiled(self, status: int, duration: float) -> None:
        """Count a request answered by aiohttp itself (a 404/405): no handler, no steps to time."""
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.duration_buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "max_step_ms": round(self.max_step * 1000.0, 3),
            "last_step_ms": round(self.last_step * 1000.0, 3),
        }


_DURATION_LE = le_labels(DURATION_BUCKETS)
_STEP_LE = le_labels(STEP_BUCKETS)


class RouteStats(Collector):
    """Every route's record, the totals, and the per-route Prometheus families."""

    def __init__(self) -> None:
        self.by_route: dict[str, RouteRecord] = {}

    def record_for(self, route: str) -> RouteRecord:
        """The record requests of `route` go into (made on first use)."""
        record = self.by_route.get(route)
        if record is None:
            record = self.by_route[route] = RouteRecord(route)
        return record

    @property
    def in_flight(self) -> int:
        """Requests being handled now (summed over routes: read rarely, counted per route)."""
        return sum(rec.in_flight for rec in list(self.by_route.values()))

    @property
    def total(self) -> int:
        """Requests answered since start."""
        return sum(rec.count for rec in list(self.by_route.values()))

    def in_flight_by_route(self) -> dict[str, int]:
        # called from the watchdog thread: copy first, the loop may add routes meanwhile
        return {r: rec.in_flight for r, rec in list(self.by_route.items()) if rec.in_flight}

    def _seen(self) -> list[tuple[str, RouteRecord]]:
        # records exist for every route from startup; show the ones that have had a request
        return [
            (r, rec) for r, rec in sorted(self.by_route.items()) if rec.statuses or rec.in_flight
        ]

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        return {route: rec.as_dict() for route, rec in self._seen()}

    def longest_step(self) -> tuple[str, float] | None:
        """The route with the longest step seen so far, and that step in ms."""
        seen = self._seen()
        if not seen:
            return None
        route, rec = max(seen, key=lambda item: item[1].max_step)
        return route, rec.max_step * 1000.0

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "looplab_requests",
            "Requests answered, by route and status.",
            labels=["route", "status"],
        )
        duration = HistogramMetricFamily(
            "looplab_request_duration_seconds", "Handler wall time, by route.", labels=["route"]
        )
        steps = HistogramMetricFamily(
            "looplab_handler_step_seconds",
            "Longest synchronous stretch (no yield to the loop) per request, by route.",
            labels=["route"],
        )
        for route, rec in sorted(list(self.by_route.items())):
            if not rec.statuses:
                continue  # in flight only: nothing answered yet
            for status, count in sorted(rec.statuses.items()):
                requests.add_metric([route, str(status)], count)
            duration.add_metric(
                [route],
                cumulative_buckets(_DURATION_LE, rec.duration_buckets),
                rec.duration_sum,
            )
            steps.add_metric([route], cumulative_buckets(_STEP_LE, rec.step_buckets), rec.step_sum)
        yield requests
        yield duration
        yield steps
