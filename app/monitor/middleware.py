"""Request instrumentation: every request is counted, timed and step-profiled.

It does what a middleware would, but is installed on the routes themselves when the app starts:
each route's handler is wrapped once, bound to its route's record, so a request needs no route
lookup. Any aiohttp middleware, even a no-op one, wraps every request in aiohttp's own
`_fix_request_current_app` coroutine and an lru_cache lookup of the handler chain: 1.4 µs per
request measured in-process, more than the wrapper here without its work (docs/benchmarks.md,
"Instrumentation overhead"). Requests that match no route (404, 405) are counted under the route
"unmatched": a catch-all route, added last, so aiohttp's router reaches it only after every real
route has failed to match (wrapping the router's `resolve` instead cost every request an extra
coroutine).

Each request's handler coroutine is driven step by step (app.monitor.steps) and accounted into its
route's record. Two implementations do it: the C extension app.monitor._stepdriver (`Metered`
handlers returning a `StepDriver`), or, when that was not built or LOOP_LAB_NO_EXTENSIONS is set,
the generator `_metered_steps` below. They record the same figures (tests/test_stepdriver.py);
the C one costs a fraction (docs/benchmarks.md, "Instrumentation overhead").
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from app.keys import MONITOR
from app.monitor.steps import NO_EXTENSIONS_ENV, STEPS, StepRecord, speedups

if TYPE_CHECKING:
    from app.monitor.routes import AnyRouteRecord

log = logging.getLogger("loop_lab.monitor")

UNMATCHED = "unmatched"
# any path at all, newlines included (`.` would leave a path with a decoded %0A to aiohttp's own
# unmetered 404); routes are tried most specific first, and this one is indexed under "/"
UNMATCHED_PATH = r"/{unmatched_path:[\s\S]*}"
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
    if stats.implementation == "c":
        log.info("step profiler: C extension app.monitor._stepdriver")
    elif speedups is None:
        log.info("step profiler: pure Python (the C extension was not built)")
    else:
        log.info("step profiler: pure Python (%s is set)", NO_EXTENSIONS_ENV)
    for route in app.router.routes():
        if route.handler in _UNMETERED:
            continue
        resource = route.resource
        name = UNMATCHED if resource is None else resource.canonical
        _meter_route(route, stats.record_for(name))

    # after every real route: among the routes indexed under "/" it comes last
    catch_all = app.router.add_route("*", UNMATCHED_PATH, _unmatched)
    _meter_route(catch_all, stats.record_for(UNMATCHED))


async def _unmatched(request: web.Request) -> web.StreamResponse:
    """aiohttp's own answer to a request no route took: 405 if a route has the path, else 404."""
    catch_all = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not catch_all:  # none of them matched, or this one would not run
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _meter_route(route: AbstractRoute, record: AnyRouteRecord) -> None:
    """Make `route` call its handler driven step by step, recorded in `record`."""
    handler = cast(Any, route.handler)  # a coroutine function or a class-based view
    if speedups is not None and isinstance(record, speedups.RouteCounters):
        # a C callable: calls the handler, returns its coroutine wrapped in a StepDriver
        route._handler = speedups.Metered(handler, record, isinstance(handler, type))
        return
    if isinstance(handler, type):  # a class-based view: awaitable, but not a coroutine

        def metered(request: web.Request) -> Awaitable[web.StreamResponse]:
            request[STEPS] = steps = StepRecord()  # demo responses read their max_step_ms there
            return _metered(handler(request).__await__(), record, steps)

    else:

        def metered(request: web.Request) -> Awaitable[web.StreamResponse]:
            request[STEPS] = steps = StepRecord()
            return _metered(handler(request), record, steps)

    # aiohttp checks a handler only when the route is made; `metered` returns an awaitable
    # without a coroutine frame of its own, which is what `await route.handler(request)` needs
    route._handler = metered  # type: ignore[assignment]


def http_error_response(exc: web.HTTPException) -> web.Response:
    """The answer a raised HTTPException stands for, as a plain response to return instead.

    Re-raised, it would reach aiohttp's `_handle_request`, which keeps it as the response in a
    local of the very frame its traceback holds: one reference cycle (~7 KB with the request and
    connection it keeps) per 400/404/503. Under `--gc tuned` cycles wait for a rare full
    collection, so a flood of refused requests would pile up memory (docs/reliability.md, 4).
    """
    # a 404/405's exception is also held by the route whose handler raised it, which its traceback
    # holds in turn: the exception is answered and done with, so its traceback can go
    exc.__traceback__ = None
    return web.Response(status=exc.status, reason=exc.reason, headers=exc.headers, body=exc.body)


if speedups is not None:
    # where the C driver stores itself for demo handlers to read; the errors that get a status of
    # their own; the answer to a raised HTTPException, as `_metered_steps` answers it
    speedups.configure(
        steps_key=STEPS,
        http_exception=web.HTTPException,
        cancelled_error=asyncio.CancelledError,
        http_error_response=http_error_response,
    )


def _metered_steps(
    coro: Coroutine[Any, Any, web.StreamResponse] | Generator[Any, Any, web.StreamResponse],
    record: AnyRouteRecord,
    steps: StepRecord,
) -> Generator[Any, Any, web.StreamResponse]:
    """Drive one request's handler step by step, timing it in `steps`, and record it in `record`.

    Stepping and accounting in one generator, so a request costs one generator frame here, not a
    chain of them. The C driver (app.monitor._stepdriver) does the same: keep the two in line.
    """
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
        record.add(status, ended - steps.started, steps.max_step)


# generator-based: the wrapper adds one generator frame per request, not a coroutine plus an
# awaitable object
_metered = types.coroutine(_metered_steps)
