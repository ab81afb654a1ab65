"""Metered handlers: every routed request is counted, timed and step-profiled, on public API only.

The monitor registers each route with its handler wrapped (`add_routes`), not through a
middleware: an app with any middleware pays aiohttp's middleware machinery on every request
(docs/benchmarks.md, "Instrumentation overhead"). The wrapper calls the handler and, instead of
awaiting its coroutine, drives it itself: each `send()` into it is one step (app.monitor.steps),
timed with two clock reads. Whatever the handler awaits is yielded up to the Task untouched, so it
behaves as if awaited directly, on asyncio and uvloop alike. The outcome goes into the route's
record (app.monitor.route_stats). Requests no route takes never reach a handler of the app: aiohttp
answers them 404 or 405 itself, and app.monitor.unmatched counts them.
"""

from __future__ import annotations

import asyncio
import functools
import types
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable
from time import perf_counter
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractView
from aiohttp.typedefs import Handler

from app.monitor.route_stats import RouteRecord, RouteStats
from app.monitor.steps import STEPS, StepRecord

UNMATCHED = "unmatched"  # the route name of requests no route took (404, 405)
CLIENT_CLOSED = 499  # the client went away before the answer (nginx's convention)

# Streams that last as long as a client stays (the dashboard's /events) are not requests in the
# sense the figures mean: each open dashboard would show as one request in flight for hours. They
# bypass the accounting; their TCP connections still count as open connections.
_UNMETERED: set[Callable[..., Any]] = set()
_METERED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()  # the wrappers metered() made
H = TypeVar("H", bound=Callable[..., Any])


def unmetered(handler: H) -> H:
    """Keep a long-lived stream handler out of request counts, in-flight and step profiling."""
    _UNMETERED.add(handler)
    return handler


def metered(handler: Handler | type[AbstractView], record: RouteRecord) -> Handler:
    """`handler` driven step by step and counted in `record`: what its route is registered with."""

    @functools.wraps(handler, updated=())  # a view class's attributes stay on the class
    async def metered_handler(request: web.Request) -> web.StreamResponse:
        request[STEPS] = steps = StepRecord()  # demo responses read their max_step_ms there
        return await _drive(handler(request), record, steps)

    _METERED.add(metered_handler)
    return metered_handler


def add_routes(
    app: web.Application, stats: RouteStats, routes: Iterable[web.AbstractRouteDef]
) -> None:
    """Register `routes` in `app`, each handler metered into its route's record in `stats`."""
    for route in routes:
        if not isinstance(route, web.RouteDef):  # a static directory: aiohttp's own handler
            raise TypeError(f"{route!r} cannot be metered: serve its files from a handler")
        handler = route.handler
        if handler not in _UNMETERED:
            # the record is named by the resource's canonical path; registering the route below
            # reuses this resource (aiohttp reuses the last one added for the same path and name)
            resource = app.router.add_resource(route.path, name=route.kwargs.get("name"))
            handler = metered(handler, stats.record_for(resource.canonical))
        web.RouteDef(route.method, route.path, handler, route.kwargs).register(app.router)


def unmetered_routes(app: web.Application) -> list[str]:
    """Routes of `app` whose requests the monitor would not see (added around `add_routes`)."""
    return [
        f"{route.method} {route.resource.canonical if route.resource else route}"
        for route in app.router.routes()
        if route.handler not in _METERED and route.handler not in _UNMETERED
    ]


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
    steps.max_step = 0.0
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
