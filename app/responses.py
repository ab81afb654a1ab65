"""The fields every demo response carries, so any answer says how it was served."""

from __future__ import annotations

from time import perf_counter
from typing import Any

from aiohttp import web

from app.keys import MONITOR
from app.monitor.steps import current_max_step_ms


def demo_response(request: web.Request, mode: str, started: float, **fields: Any) -> web.Response:
    """`mode`, the parameters used, `elapsed`, `loop`, `pid` and this request's `max_step_ms`."""
    monitor = request.app[MONITOR]
    body: dict[str, Any] = {"mode": mode, **fields}
    body["elapsed"] = round(perf_counter() - started, 6)
    body["loop"] = monitor.loop
    body["pid"] = monitor.pid
    body["max_step_ms"] = round(current_max_step_ms(request), 3)
    return web.json_response(body)
