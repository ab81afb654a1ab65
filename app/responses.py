"""The fields every demo response carries, so any answer says how it was served."""

from __future__ import annotations

import json
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


def unavailable(service: str, error: BaseException | str, **names: str) -> web.HTTPException:
    """503 JSON for a service that is down, failing or too slow: what went wrong, and `names`
    (which service and how it was called), so the answer says where to look."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    body = {"error": f"{service} unavailable: {text.strip().rstrip(':')}", **names}
    return web.HTTPServiceUnavailable(text=json.dumps(body), content_type="application/json")
