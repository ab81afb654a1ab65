"""Typed application-state keys (web.AppKey), so state is never looked up by a bare string."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiohttp

    from app.config import Settings
    from app.database import Database
    from app.events import Broadcaster
    from app.executors import Executors
    from app.gctune import GcPauses, YoungSweeper
    from app.metrics import Metrics
    from app.monitor.monitor import Monitor
    from app.resolving import CountedExecutor
    from app.upstream import Upstream

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
MONITOR: web.AppKey[Monitor] = web.AppKey("monitor")
EXECUTORS: web.AppKey[Executors] = web.AppKey("executors")
GC: web.AppKey[GcPauses] = web.AppKey("gc")
SWEEPER: web.AppKey[YoungSweeper] = web.AppKey("gc_young_sweeper")
BROADCASTER: web.AppKey[Broadcaster] = web.AppKey("events_broadcaster")
DATABASE: web.AppKey[Database] = web.AppKey("database")
UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream")
HTTP_CLIENT: web.AppKey[aiohttp.ClientSession] = web.AppKey("http_client")
DEFAULT_EXECUTOR: web.AppKey[CountedExecutor] = web.AppKey("default_executor")
