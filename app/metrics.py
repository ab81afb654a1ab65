"""Prometheus metrics and `/metrics`: a registry per app, so tests and workers never share one."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.keys import METRICS

# Loop lag lives between "fine" (<1 ms) and "the loop was frozen for seconds".
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        # observed 50 times a second on the loop: plain counts, exported at scrape time
        self.loop_lag = PlainHistogram(
            "looplab_loop_lag_seconds",
            "How late the loop ran a timer callback (time the loop could not serve anyone).",
            LAG_BUCKETS,
        )
        r.register(self.loop_lag)
        # looplab_requests_total, looplab_request_duration_seconds and
        # looplab_handler_step_seconds are per-request, so app.monitor.route_stats.RouteStats
        # counts them without locks and exports them at scrape time (bucket bounds below).
        self.loop_info = Gauge(
            "looplab_loop_info",
            "The running event loop implementation (value 1).",
            ["loop"],
            registry=r,
        )
        self.stalls = Counter(
            "looplab_loop_stalls",
            "Times the loop did not run for longer than the stall threshold, by dominant cause.",
            ["cause"],
            registry=r,
        )

    def register_live(self, snapshot: Callable[[], LiveValues]) -> None:
        """Export values read at scrape time, so the hot path never touches a gauge."""
        self.registry.register(_LiveCollector(snapshot))


def le_labels(bounds: Sequence[float]) -> tuple[str, ...]:
    """`le` labels spelled as prometheus_client spells its own (`0.005`, `1.0`, `+Inf`)."""
    return tuple(str(floatToGoString(b)) for b in (*bounds, float("inf")))  # type: ignore[no-untyped-call]


def cumulative_buckets(labels: Sequence[str], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus buckets from per-bucket counts: cumulative counts under their `le` labels."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for label, count in zip(labels, counts, strict=True):
        total += count
        buckets.append((label, total))
    return buckets


class PlainHistogram(Collector):
    """A histogram counted with plain arithmetic (one `bisect`), exported when scraped.

    prometheus_client's Histogram takes a lock per update and walks its bounds in Python; updates
    and scrapes here all run on the loop thread, so a scrape never sees a half-made update.
    """

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        self.labels = le_labels(self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket; the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' `le` bucket
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative_buckets(self.labels, self.counts), self.sum)
        yield family


@dataclass(frozen=True, slots=True)
class LiveValues:
    in_flight: int
    open_connections: int
    accepted_connections: int
    executor: dict[str, dict[str, int]]
    rss_bytes: int


class _LiveCollector(Collector):
    def __init__(self, snapshot: Callable[[], LiveValues]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        v = self._snapshot()
        yield GaugeMetricFamily(
            "looplab_in_flight_requests", "Requests being handled now.", value=v.in_flight
        )
        yield GaugeMetricFamily(
            "looplab_open_connections",
            "TCP connections the server holds open now.",
            value=v.open_connections,
        )
        yield CounterMetricFamily(
            "looplab_accepted_connections",
            "TCP connections accepted since start.",
            value=v.accepted_connections,
        )
        busy = GaugeMetricFamily("looplab_executor_busy", "Executor jobs running.", labels=["pool"])
        queued = GaugeMetricFamily(
            "looplab_executor_queued", "Executor jobs waiting for a worker.", labels=["pool"]
        )
        for pool, counts in v.executor.items():
            busy.add_metric([pool], counts["busy"])
            queued.add_metric([pool], counts["queued"])
        yield busy
        yield queued
        yield GaugeMetricFamily(
            "looplab_process_rss_bytes", "Resident set size of this process.", value=v.rss_bytes
        )


routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
