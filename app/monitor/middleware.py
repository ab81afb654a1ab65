"""Request instrumentation: every request is counted, timed and step-profiled.

It does what a middleware would, but is installed on the routes themselves when the app starts:
each route's handler is wrapped once, bound to its route's record, so a request needs no route
lookup. Any aiohttp middleware, even a no-op one, wraps every request in aiohttp's own
`_fix_request_current_app` coroutine and an lru_cache lookup of the handler chain: 1.4 µs per
request measured in-process, more than the wrapper here without its work (docs/benchmarks.md,
"Instrumentation overhead"). Requests that match no route (404, 405) are caught by wrapping the
router's `resolve` and counted under the route "unmatched".
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from time import perf_counter
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute, MatchInfoError, UrlMappingMatchInfo

from app.keys import MONITOR
from app.monitor.routes import RouteRecord
from app.monitor.steps import StepRecord, current_steps

UNMATCHED = "unmatched"
CLIENT_CLOSED = 499  # the client went away before the answer (nginx's convention)

# Streams that last as long as a client stays (the dashboard's /events) are not requests in the
# sense the figures mean: each open dashboard would show as one request in flight for hours and be
# step-profiled as one endless request. They bypass the accounting; their TCP connections still
# count as open connections.
_UNMETERED: set[Callable[..., Any]] = set()
H = TypeVar("H", bound=Callable[..., Any])


def unmetered(handler: H) -> H:
    """Keep a long-lived stream handler out of request counts, in-flight and step profiling."""
    _UNMETERED.add(handler)
    return handler


def instrument(app: web.Application) -> None:
    """Count, time and step-profile every request of `app` from its startup on.

    Installs at startup, after every route has been added and the monitor exists.
    """
    app.on_startup.append(_install)


async def _install(app: web.Application) -> None:
    stats = app[MONITOR].routes
    for route in app.router.routes():
        if route.handler in _UNMETERED:
            continue
        resource = route.resource
        name = UNMATCHED if resource is None else resource.canonical
        _meter_route(route, stats.record_for(name))

    unmatched = stats.record_for(UNMATCHED)
    resolve = app.router.resolve

    async def resolve_and_meter(request: web.Request) -> UrlMappingMatchInfo:
        match = await resolve(request)
        if isinstance(match, MatchInfoError):
            # a fresh route per request whose handler raises the 404/405: meter it like any other
            _meter_route(match.route, unmatched)
        return match

    # an instance attribute shadows the method Application._handle calls
    app.router.resolve = resolve_and_meter  # type: ignore[method-assign]


def _meter_route(route: AbstractRoute, record: RouteRecord) -> None:
    handler: Any = route.handler
    if isinstance(handler, type):  # a class-based view: awaitable, but not a coroutine

        def metered(request: web.Request) -> Awaitable[web.StreamResponse]:
            return _metered(handler(request).__await__(), record)

    else:

        def metered(request: web.Request) -> Awaitable[web.StreamResponse]:
            return _metered(handler(request), record)

    # aiohttp checks a handler only when the route is made; `metered` returns an awaitable
    # without a coroutine frame of its own, which is what `await route.handler(request)` needs
    route._handler = metered  # type: ignore[assignment]


def _metered_steps(
    coro: Coroutine[Any, Any, web.StreamResponse] | Generator[Any, Any, web.StreamResponse],
    record: RouteRecord,
) -> Generator[Any, Any, web.StreamResponse]:
    """Drive one request's handler step by step and record it into its route's `record`.

    This is `steps.drive_steps` and the accounting in one generator, so a request costs one
    generator frame here, not a chain of them. Keep its stepping in line with `drive_steps`.
    """
    steps = StepRecord()
    token = current_steps.set(steps)  # demo responses read their own max_step_ms through it
    record.in_flight += 1
    send = coro.send
    send_value: Any = None
    error: BaseException | None = None
    status = 500
    steps.started = started = perf_counter()
    try:
        while True:
            steps.step_started = started
            yielded = send(send_value) if error is None else coro.throw(error)
            step = perf_counter() - started
            if step > steps.max_step:
                steps.max_step = step
            steps.step_started = 0.0
            try:
                send_value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and friends go into the handler
                error = exc
                send_value = None
            started = perf_counter()
    except StopIteration as stop:
        response: web.StreamResponse = stop.value
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        ended = perf_counter()
        if steps.step_started:  # the handler returned or raised: its last step ends now
            steps.step_started = 0.0
            if ended - started > steps.max_step:
                steps.max_step = ended - started
        current_steps.reset(token)
        record.in_flight -= 1
        record.add(status, ended - steps.started, steps.max_step)


# generator-based: the wrapper adds one generator frame per request, not a coroutine plus an
# awaitable object
_metered = types.coroutine(_metered_steps)
