"""`/stats`: a JSON snapshot of the monitor (the dashboard's stream sends the same)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.keys import DEFAULT_EXECUTOR, EXECUTORS, GC, MONITOR

routes = web.RouteTableDef()


def snapshot(app: web.Application) -> dict[str, Any]:
    """Everything /stats reports; the dashboard stream reuses it."""
    monitor = app[MONITOR]
    lag = monitor.lag.summary()
    longest = monitor.routes.longest_step()
    return {
        "loop": monitor.loop,
        "pid": monitor.pid,
        "uptime_s": round(monitor.uptime(), 3),
        "lag_ms": {k: round(v, 3) for k, v in lag.as_dict().items()},
        "lag_window_s": monitor.lag.window,
        "in_flight": monitor.routes.in_flight,
        "requests_total": monitor.routes.total,
        "connections": monitor.connections.as_dict(),
        "accept": monitor.accept.as_dict(),
        "routes": monitor.routes.as_dict(),
        "longest_step": None
        if longest is None
        else {"route": longest[0], "max_step_ms": round(longest[1], 3)},
        # the loop's default executor too: loop.getaddrinfo and run_in_executor(None) queue there
        "executor": {**app[EXECUTORS].as_dict(), "default": app[DEFAULT_EXECUTOR].as_dict()},
        "executor_limits": app[EXECUTORS].limits_dict(),
        "stalls": monitor.watchdog.stalls if monitor.watchdog is not None else 0,
        "stalls_recent": monitor.watchdog.recent_stalls() if monitor.watchdog is not None else [],
        # fractions of wall time the loop thread was not in its selector (null off Linux)
        "utilization": monitor.utilization.summary(),
        "rss_mb": round(monitor.rss() / 2**20, 2),
        "rss_mb_peak": round(monitor.rss_peak() / 2**20, 2),
        "gc": app[GC].as_dict(),
    }


@routes.get("/stats")
async def stats_handler(request: web.Request) -> web.Response:
    return web.json_response(snapshot(request.app))
