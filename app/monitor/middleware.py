"""The instrumentation middleware: every request is counted, timed and step-profiled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from time import perf_counter
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from app.keys import MONITOR
from app.monitor.monitor import route_of
from app.monitor.steps import StepRecord, stepped


@web.middleware
async def instrument(request: web.Request, handler: Handler) -> web.StreamResponse:
    routes = request.app[MONITOR].routes
    route = route_of(request)
    record = routes.enter(route)
    steps = StepRecord()
    status = 500
    started = perf_counter()
    try:
        response = await stepped(
            cast(Coroutine[Any, Any, web.StreamResponse], handler(request)), steps
        )
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's convention)
        raise
    finally:
        routes.leave(record, route, status, perf_counter() - started, steps.max_step)
