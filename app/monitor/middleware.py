"""The request middleware: every request is counted, timed and step-profiled, on public API only.

aiohttp calls the middleware with the request and the handler its router chose (for a request no
route takes, a handler that raises 404 or 405: those are counted under the route "unmatched").
The middleware calls the handler and, instead of awaiting its coroutine, drives it itself: each
`send()` into it is one step (app.monitor.steps), timed with two clock reads. Whatever the handler
awaits is yielded up to the Task untouched, so it behaves as if awaited directly, on asyncio and
uvloop alike. The outcome goes into the route's record (app.monitor.route_stats).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Generator
from time import perf_counter
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractView
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import AbstractRoute

from app.guard import release_unmatched_route
from app.monitor.route_stats import RouteRecord, RouteStats
from app.monitor.steps import STEPS, StepRecord

UNMATCHED = "unmatched"  # the route name of requests no route took (404, 405)
CLIENT_CLOSED = 499  # the client went away before the answer (nginx's convention)
_NEW = RouteRecord("(a route not seen yet)")  # marks a miss in the middleware's route cache

# Streams that last as long as a client stays (the dashboard's /events) are not requests in the
# sense the figures mean: each open dashboard would show as one request in flight for hours. They
# bypass the accounting; their TCP connections still count as open connections.
_UNMETERED: set[Callable[..., Any]] = set()
H = TypeVar("H", bound=Callable[..., Any])


def unmetered(handler: H) -> H:
    """Keep a long-lived stream handler out of request counts, in-flight and step profiling."""
    _UNMETERED.add(handler)
    return handler


def request_middleware(stats: RouteStats) -> Middleware:
    """The middleware that records every request of an app into `stats`."""
    # route -> its record (None: unmetered); a 404/405's route is made anew for each request
    records: dict[AbstractRoute, RouteRecord | None] = {}
    unmatched = stats.record_for(UNMATCHED)

    def record_for(route: AbstractRoute) -> RouteRecord | None:
        if route.resource is None:  # aiohttp's route for a 404/405, made for this request
            release_unmatched_route(route)  # the handler we were given is all that runs
            return unmatched
        record = None if route.handler in _UNMETERED else stats.record_for(route.resource.canonical)
        records[route] = record
        return record

    @web.middleware
    def monitor_requests(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        # a plain function returning the driver: no coroutine frame of its own per request
        route = request.match_info.route
        record = records.get(route, _NEW)
        if record is _NEW:
            record = record_for(route)
        if record is None:
            return handler(request)
        request[STEPS] = steps = StepRecord()  # demo responses read their max_step_ms there
        return _drive(handler(request), record, steps)

    return monitor_requests


def http_error_response(exc: web.HTTPException) -> web.Response:
    """The answer a raised HTTPException stands for, as a plain response to return instead.

    Re-raised, it would reach aiohttp's `_handle_request`, which keeps it as the response in a
    local of the very frame its traceback holds: one reference cycle (~7 KB with the request and
    connection it keeps) per 400/404/503, freed only by a full collection (docs/reliability.md).
    """
    exc.__traceback__ = None  # answered and done with: its traceback holds the handler's frames
    return web.Response(status=exc.status, reason=exc.reason, headers=exc.headers, body=exc.body)


@types.coroutine
def _drive(
    awaitable: Awaitable[web.StreamResponse] | AbstractView, record: RouteRecord, steps: StepRecord
) -> Generator[Any, Any, web.StreamResponse]:
    """Drive one request's handler step by step, timing it in `steps`, and record it in `record`.

    A generator-based coroutine (`types.coroutine`): `await` on it delegates to it as to any
    coroutine, and it relays each value between the Task and the handler.
    """
    # a coroutine is sent into itself; a class-based view (awaitable, not a coroutine) through
    # its __await__ iterator
    coro = awaitable if type(awaitable) is types.CoroutineType else awaitable.__await__()
    record.in_flight += 1
    send_value: Any = None
    error: BaseException | None = None
    status = 500
    steps.started = first = started = perf_counter()  # the request's start, its first step's
    try:
        while True:
            steps.step_started = started
            yielded = coro.send(send_value) if error is None else coro.throw(error)
            step = perf_counter() - started
            if step > steps.max_step:
                steps.max_step = step
            steps.step_started = 0.0
            try:
                send_value = yield yielded
                error = None
            except GeneratorExit:  # the Task is closing us: close the handler too
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
        return http_error_response(exc)
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        error = None  # a thrown-in exception's traceback holds this frame: no cycle through it
        ended = perf_counter()
        if steps.step_started:  # the handler returned or raised: its last step ends now
            steps.step_started = 0.0
            if ended - started > steps.max_step:
                steps.max_step = ended - started
        record.in_flight -= 1
        record.add(status, ended - first, steps.max_step)
