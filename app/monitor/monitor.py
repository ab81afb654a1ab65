"""The monitor: loop lag, per-route steps, connections, utilisation and the stall watchdog.

`setup(app)` makes it when the app is made and `add_routes` registers the app's routes with their
handlers metered (app.monitor.metering); `start_sampling` starts its timer and thread once the app
has started, and the cleanup context stops them with the app.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable

from aiohttp import web

from app.keys import EXECUTORS, METRICS, MONITOR, SETTINGS
from app.loops import LoopName, loop_name
from app.metrics import LiveValues, Metrics
from app.monitor import metering
from app.monitor.accept import AcceptMonitor
from app.monitor.connections import ConnectionTracker
from app.monitor.lag import LAG_INTERVAL_S, LagSampler
from app.monitor.process import peak_rss_bytes, rss_bytes
from app.monitor.route_stats import RouteStats
from app.monitor.utilization import CAUSES, INTERVAL_S, UtilizationSampler
from app.monitor.watchdog import StallWatchdog


class Monitor:
    def __init__(
        self,
        metrics: Metrics,
        stall_threshold: float,
        utilization_interval: float = INTERVAL_S,
        lag_interval: float = LAG_INTERVAL_S,
    ) -> None:
        self.metrics = metrics
        self.lag = LagSampler(lag_interval, observe=self._observe_lag)
        self.utilization = UtilizationSampler(utilization_interval)
        metrics.registry.register(self.utilization)
        for cause in CAUSES:  # every cause's count exists from the start, at 0
            metrics.stalls.labels(cause=cause)
        self.routes = RouteStats()
        metrics.registry.register(self.routes)  # exports the per-route request families
        self.connections = ConnectionTracker()
        self.accept = AcceptMonitor()  # fd exhaustion, connection cap, header timeouts
        self.stall_threshold = stall_threshold
        self.loop: LoopName = "asyncio"
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.watchdog: StallWatchdog | None = None
        self._last_beat: float | None = None  # the heartbeat of the previous lag tick

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop_name(loop)
        self.metrics.loop_info.labels(loop=self.loop).set(1)
        self.lag.start(loop)
        self._last_beat = self.lag.heartbeat  # a stall before the first tick is one too
        self.utilization.start()  # on the loop thread: it samples the thread that calls it
        self.watchdog = StallWatchdog(
            heartbeat=lambda: self.lag.heartbeat,
            threshold=self.stall_threshold,
            loop_thread_id=threading.get_ident(),
            in_flight_routes=self.routes.in_flight_by_route,
            on_stall=lambda cause: self.metrics.stalls.labels(cause=cause).inc(),
            explain=self.utilization.explain,
            started=self.started,
        )
        self.watchdog.start()

    def _observe_lag(self, lag: float) -> None:
        """Each lag tick (on the loop): the histogram, and the end of a stall it closes."""
        self.metrics.loop_lag.observe(lag)
        beat = self.lag.heartbeat
        last, self._last_beat = self._last_beat, beat
        if last is not None and beat - last > self.stall_threshold and self.watchdog is not None:
            self.watchdog.stall_ended(last, lag, beat)

    def stop(self) -> None:
        self.lag.stop()
        self.utilization.stop()
        if self.watchdog is not None:
            self.watchdog.stop()

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def rss(self) -> int:
        return rss_bytes()

    def rss_peak(self) -> int:
        """Peak RSS as the kernel counts it: not missed between samples."""
        return peak_rss_bytes()


def setup(app: web.Application) -> None:
    """Make the app's monitor and run it while the app runs."""
    settings = app[SETTINGS]
    monitor = Monitor(
        Metrics(), settings.stall_threshold, settings.utilization_interval, settings.lag_interval
    )
    app[METRICS] = monitor.metrics
    app[MONITOR] = monitor
    app.cleanup_ctx.append(_monitor_ctx)
    app.on_startup.insert(0, _every_route_metered)  # before any resource is made


def add_routes(app: web.Application, routes: Iterable[web.AbstractRouteDef]) -> None:
    """Register `routes` with their handlers metered by the app's monitor (see `setup`)."""
    metering.add_routes(app, app[MONITOR].routes, routes)


async def _every_route_metered(app: web.Application) -> None:
    """Fail at startup, not silently, if a route was added around `add_routes`."""
    missed = metering.unmetered_routes(app)
    if missed:
        raise RuntimeError(
            f"routes not metered: {', '.join(missed)}; register them with "
            "app.monitor.monitor.add_routes (or mark a stream handler @unmetered)"
        )


async def start_sampling(app: web.Application) -> None:
    """on_startup, registered last: the lag sampler and the watchdog start once the app has.

    Startup work (the process pool's spawn, `--gc tuned`'s first full collection) holds the loop
    before any client can connect: it is not loop lag anyone is served late by.
    """
    app[MONITOR].start(asyncio.get_running_loop())


async def _monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    monitor = app[MONITOR]

    def live() -> LiveValues:
        executors = app.get(EXECUTORS)
        return LiveValues(
            in_flight=monitor.routes.in_flight,
            open_connections=monitor.connections.open,
            accepted_connections=monitor.connections.accepted_total,
            executor=executors.as_dict() if executors is not None else {},
            rss_bytes=monitor.rss(),
        )

    monitor.metrics.register_live(live)
    monitor.accept.register(monitor.metrics.registry)
    try:
        yield
    finally:
        monitor.stop()
