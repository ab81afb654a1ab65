"""Metered handlers: their figures on real sockets, and the driver's coroutine semantics."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import time
import tracemalloc
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from app.application import create_app
from app.config import Settings
from app.keys import MONITOR
from app.launch import eventually, running_server
from app.loops import LoopName, loop_factory
from app.monitor import metering, monitor
from app.monitor.route_stats import RouteRecord
from app.monitor.steps import StepRecord, current_max_step_ms

BLOCK_S = 0.08


# ---- a small app of our own, on a real socket, on either loop --------------------------------


class _View(web.View):
    async def get(self) -> web.Response:
        await asyncio.sleep(0)
        time.sleep(BLOCK_S)
        return web.json_response({"max_step_ms": current_max_step_ms(self.request)})


def _extra_routes(app: web.Application, hung: asyncio.Event) -> None:
    async def blocks(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        time.sleep(BLOCK_S)
        seen_mid_step = current_max_step_ms(request)  # the step is still running
        await asyncio.sleep(0)
        after_ms = current_max_step_ms(request)
        return web.json_response({"mid_step_ms": seen_mid_step, "after_ms": after_ms})

    async def awaits(request: web.Request) -> web.Response:
        await asyncio.sleep(BLOCK_S)
        return web.json_response({"max_step_ms": current_max_step_ms(request)})

    async def teapot(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        raise web.HTTPConflict()

    async def crashes(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        raise RuntimeError("handler bug")

    async def hangs(request: web.Request) -> web.Response:
        hung.set()
        await asyncio.sleep(60)
        return web.Response(text="never")

    monitor.add_routes(
        app,
        [
            web.get("/t/blocks", blocks),
            web.get("/t/awaits", awaits),
            web.get("/t/teapot", teapot),
            web.get("/t/crashes", crashes),
            web.get("/t/hangs", hangs),
            web.view("/t/view", _View),
        ],
    )


@asynccontextmanager
async def _serving() -> AsyncIterator[tuple[web.Application, str, asyncio.Event]]:
    hung = asyncio.Event()
    app = create_app(Settings(port=0, process_workers=1, thread_workers=1))
    _extra_routes(app, hung)
    # as app.server runs it: a client that goes away cancels its handler
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield app, f"http://127.0.0.1:{runner.addresses[0][1]}", hung
    finally:
        await runner.cleanup()


def _run(loop_name: LoopName, scenario: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        return runner.run(scenario())


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body


async def _disconnect_while_hung(url: str, hung: asyncio.Event) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /t/hangs HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(hung.wait(), 10)
    writer.transport.abort()  # the client goes away mid-request
    del reader


async def _exercise(app: web.Application, url: str, hung: asyncio.Event) -> dict[str, Any]:
    """One request of every kind; returns what they answered and what the monitor recorded."""
    routes = app[MONITOR].routes
    answers: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for path in ("blocks", "awaits", "teapot", "crashes", "view"):
            answers[path] = await _get(session, f"{url}/t/{path}")
        answers["missing"] = await _get(session, f"{url}/t/no-such-route")
        await _disconnect_while_hung(url, hung)
        await eventually(lambda: not routes.in_flight_by_route(), within=10, what="all answered")
        async with session.get(f"{url}/stats") as response:
            answers["stats"] = await response.json()
    return answers


def test_same_figures_on_real_sockets(loop_name: LoopName) -> None:
    """Steps, statuses (409, 500, 404, 499), views and in-flight are recorded on either loop."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with _serving() as (app, url, hung):
            answers = await _exercise(app, url, hung)
            records = app[MONITOR].routes.by_route
            statuses = {r: dict(rec.statuses) for r, rec in records.items() if rec.statuses}
            return answers, statuses

    answers, statuses = _run(loop_name, scenario)
    stats = answers["stats"]
    status, body = answers["blocks"]
    assert status == 200
    assert BLOCK_S * 1000 * 0.95 <= body["mid_step_ms"] < BLOCK_S * 1000 * 4
    assert body["after_ms"] >= body["mid_step_ms"]
    status, body = answers["awaits"]
    assert status == 200
    assert body["max_step_ms"] < BLOCK_S * 1000 / 2  # it slept by awaiting: no long step
    status, body = answers["view"]
    assert status == 200
    assert body["max_step_ms"] >= BLOCK_S * 1000 * 0.95
    assert answers["teapot"][0] == 409
    assert answers["crashes"][0] == 500
    assert answers["missing"][0] == 404
    assert statuses == {
        "/t/blocks": {200: 1},
        "/t/awaits": {200: 1},
        "/t/teapot": {409: 1},
        "/t/crashes": {500: 1},
        "/t/view": {200: 1},
        "/t/hangs": {499: 1},
        "unmatched": {404: 1},
        "/stats": {200: 1},
    }
    routes = stats["routes"]
    assert routes["/t/blocks"]["max_step_ms"] >= BLOCK_S * 1000 * 0.95
    assert routes["/t/view"]["max_step_ms"] >= BLOCK_S * 1000 * 0.95
    assert routes["/t/awaits"]["max_step_ms"] < BLOCK_S * 1000 / 2
    assert routes["/t/crashes"]["errors"] == 1
    in_flight = {route: figures["in_flight"] for route, figures in routes.items()}
    assert in_flight == {route: 1 if route == "/stats" else 0 for route in routes}
    assert stats["in_flight"] == 1  # the /stats request itself


async def test_routes_in_flight_while_a_handler_blocks() -> None:
    """While /block holds the loop, the watchdog's view (another thread) shows it in flight."""
    with (
        running_server("asyncio") as server,
        socket.create_connection(
            (server.server.host, server.server.port)  # type: ignore[union-attr]
        ) as conn,
    ):
        assert server.server is not None
        routes = server.server.app[MONITOR].routes
        conn.sendall(b"GET /block?delay=0.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await eventually(  # read as the watchdog reads it, from another thread
            lambda: routes.in_flight_by_route().get("/block") == 1,
            within=10,
            what="/block in flight",
            interval=0.005,
        )
        assert b"200 OK" in await asyncio.to_thread(conn.recv, 65536)
        await eventually(lambda: not routes.in_flight_by_route(), within=10, what="all answered")
        assert routes.by_route["/block"].max_step >= 0.45


# ---- the driver as a coroutine: send, throw, close, in-process --------------------------------


class _Response:
    """What a driver reads of a response: its status."""

    def __init__(self, status: int = 200) -> None:
        self.status = status


def _driver() -> tuple[RouteRecord, Callable[[Any], Any]]:
    """A route's record, and a function wrapping a coroutine in the metered handler's driver."""
    record = RouteRecord("/x")
    return record, lambda coro: metering._drive(coro, record, StepRecord())


class _Future:
    """Something a handler yields up to the Task, passed through untouched."""


def _suspend_once(value: Any) -> Generator[Any, Any, Any]:
    sent = yield value
    return sent


def test_statuses_count_past_small_ints_and_outside_http() -> None:
    """Counts per status stay exact past 256 (Python's cached ints) and for any status number."""
    record, _ = _driver()
    for _ in range(300):
        record.add(200, 0.001, 0.001)
    record.add(999, 0.001, 0.001)
    record.add(1000, 0.001, 0.001)
    record.add(200, 0.001, 0.001)
    assert dict(record.statuses) == {200: 301, 999: 1, 1000: 1}


def test_values_pass_through_both_ways() -> None:
    """What the handler yields reaches the caller; what the caller sends reaches the handler."""
    record, wrap = _driver()
    token = _Future()

    async def handler() -> _Response:
        got = await _Awaitable(token)
        return _Response(got)

    driver = wrap(handler())
    assert driver.send(None) is token
    assert record.in_flight == 1
    with pytest.raises(StopIteration) as stop:
        driver.send(201)
    assert stop.value.value.status == 201
    assert record.in_flight == 0
    assert dict(record.statuses) == {201: 1}
    with pytest.raises(StopIteration):
        driver.send(None)  # exhausted, like a finished generator
    assert dict(record.statuses) == {201: 1}


class _Awaitable:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return _suspend_once(self.value)


def test_throw_goes_into_the_handler() -> None:
    """A thrown exception reaches the handler at its await; what it does then is recorded."""
    record, wrap = _driver()
    caught: list[BaseException] = []

    async def handler() -> _Response:
        try:
            await _Awaitable(_Future())
        except ValueError as exc:
            caught.append(exc)
            return _Response(202)
        return _Response(200)

    driver = wrap(handler())
    driver.send(None)
    with pytest.raises(StopIteration) as stop:
        driver.throw(ValueError("in"))
    assert stop.value.value.status == 202
    assert [str(e) for e in caught] == ["in"]
    assert dict(record.statuses) == {202: 1}
    assert record.in_flight == 0


@pytest.mark.parametrize(("exc", "status"), [(asyncio.CancelledError(), 499), (KeyError("k"), 500)])
def test_uncaught_throw_is_counted_by_kind(exc: BaseException, status: int) -> None:
    """An uncaught cancellation goes on up as a 499, any other error as a 500."""
    record, wrap = _driver()

    async def handler() -> _Response:
        await _Awaitable(_Future())
        return _Response()

    driver = wrap(handler())
    driver.send(None)
    with pytest.raises(type(exc)) as raised:
        driver.throw(exc)
    assert raised.value is exc
    assert dict(record.statuses) == {status: 1}
    assert record.in_flight == 0


@pytest.mark.parametrize("how", ["raised", "thrown"])
def test_http_exception_is_answered_not_raised(how: str) -> None:
    """An HTTPException ends the request as the plain response it stands for, traceback dropped."""
    record, wrap = _driver()
    exc = web.HTTPConflict(text="taken")

    async def handler() -> _Response:
        await _Awaitable(_Future())
        raise exc

    driver = wrap(handler())
    driver.send(None)
    # sent: the handler raises it; thrown: it goes through the handler uncaught
    step, arg = (driver.send, None) if how == "raised" else (driver.throw, exc)
    with pytest.raises(StopIteration) as stop:
        step(arg)
    answer = stop.value.value
    assert type(answer) is web.Response
    assert (answer.status, answer.text) == (409, "taken")
    assert (record.in_flight, dict(record.statuses)) == (0, {409: 1})
    assert exc.__traceback__ is None  # no cycle through the handler's frames is left


def test_bad_throw_arguments_leave_the_request_running() -> None:
    """throw() with arguments a generator rejects raises TypeError; the request goes on."""
    record, wrap = _driver()

    async def handler() -> _Response:
        await _Awaitable(_Future())
        return _Response()

    driver = wrap(handler())
    driver.send(None)
    for args in [(1,), (ValueError, None, 5), (ValueError("x"), "value")]:
        # the (type, value, tb) form is deprecated (a warning on 3.12+): the TypeError is the point
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(TypeError):
                driver.throw(*args)
    assert (record.in_flight, dict(record.statuses)) == (1, {})
    with pytest.raises(StopIteration) as stop:
        driver.send(None)
    assert stop.value.value.status == 200
    assert dict(record.statuses) == {200: 1}
    with pytest.raises(TypeError):  # exhausted: still a TypeError
        driver.throw(1)


def test_cleanup_raising_on_close_is_counted_by_kind() -> None:
    """A handler whose cleanup raises on close() is counted as the Python driver counts it."""
    record, wrap = _driver()

    def handler(error: BaseException) -> Callable[[], Any]:
        async def cleanup_raises() -> _Response:
            try:
                await _Awaitable(_Future())
            finally:
                raise error
            return _Response()

        return cleanup_raises

    driver = wrap(handler(asyncio.CancelledError())())
    driver.send(None)
    with pytest.raises(asyncio.CancelledError):
        driver.close()
    driver = wrap(handler(web.HTTPGone())())
    driver.send(None)
    driver.close()  # answered: close() drops the answer, as a generator's close does
    driver = wrap(handler(KeyError("k"))())
    driver.send(None)
    with pytest.raises(KeyError):
        driver.close()
    assert (record.in_flight, dict(record.statuses)) == (0, {499: 1, 410: 1, 500: 1})


async def _cleans_up(cleaned: list[str]) -> _Response:
    """A handler that suspends once and notes that its `finally` ran."""
    try:
        await _Awaitable(_Future())
    finally:
        cleaned.append("finally")
    return _Response()


def test_close_between_steps_closes_the_handler() -> None:
    """close() runs the handler's cleanup, counts a 500 and leaves in-flight at 0."""
    record, wrap = _driver()
    cleaned: list[str] = []
    driver = wrap(_cleans_up(cleaned))
    driver.send(None)
    driver.close()
    assert cleaned == ["finally"]
    assert dict(record.statuses) == {500: 1}
    assert record.in_flight == 0
    driver.close()  # a second close does nothing
    assert dict(record.statuses) == {500: 1}


def test_close_before_the_first_step_records_nothing() -> None:
    """A driver closed before it ran leaves no trace: no count, nothing in flight."""
    record, wrap = _driver()

    async def handler() -> _Response:
        return _Response()

    coro = handler()
    driver = wrap(coro)
    driver.close()
    coro.close()  # never awaited: close it here so it does not warn when collected
    assert dict(record.statuses) == {}
    assert record.in_flight == 0


def test_generator_exit_thrown_in_closes_and_propagates() -> None:
    """throw(GeneratorExit) closes the handler and re-raises, as a generator's yield from does."""
    record, wrap = _driver()
    cleaned: list[str] = []
    driver = wrap(_cleans_up(cleaned))
    driver.send(None)
    with pytest.raises(GeneratorExit):
        driver.throw(GeneratorExit())
    assert cleaned == ["finally"]
    assert dict(record.statuses) == {500: 1}


def test_step_times_and_task_cancellation() -> None:
    """Inside a Task: a blocking step is timed, and cancelling the Task cancels the handler."""
    record, wrap = _driver()
    cleaned = False

    async def handler() -> _Response:
        nonlocal cleaned
        time.sleep(BLOCK_S)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned = True
        return _Response()

    async def request() -> _Response:
        awaited: _Response = await wrap(handler())
        return awaited

    async def scenario() -> None:
        task = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert cleaned
    assert dict(record.statuses) == {499: 1}
    assert record.max_step >= BLOCK_S * 0.95
    assert record.in_flight == 0


# ---- nothing is kept: references, objects and memory stay flat over 10,000 requests -----------


def _drive(driver: Any) -> Any:
    """Run a driver whose handler never really suspends (bare yields only) to completion."""
    try:
        while True:
            driver.send(None)
    except StopIteration as stop:
        return stop.value


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Collect first, then keep the cyclic GC off so only reference counting frees objects."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_ten_thousand_requests_leak_nothing(no_gc: None) -> None:
    """Coroutines and responses are freed at once (no GC); refcounts and objects stay flat."""
    record, wrap = _driver()
    response = _Response()
    freed: list[int] = []

    async def ok() -> _Response:
        await _Awaitable(None)
        return response

    async def fails() -> _Response:
        await _Awaitable(None)
        raise web.HTTPBadRequest()

    async def fresh() -> _Response:
        await _Awaitable(None)
        answer = _Response(203)
        weakref.finalize(answer, freed.append, 1)
        return answer

    def one_round() -> None:
        for handler in (ok, fails, fresh):
            coro = handler()
            alive = weakref.ref(coro)
            with suppress(web.HTTPBadRequest):
                _drive(wrap(coro))
            del coro
            assert alive() is None, "the handler coroutine outlived its request"

    for _ in range(200):  # warm up caches and free lists
        one_round()
    refs = (sys.getrefcount(record), sys.getrefcount(response), sys.getrefcount(ok))
    objects = len(gc.get_objects())
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(10_000 // 3):
            one_round()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (sys.getrefcount(record), sys.getrefcount(response), sys.getrefcount(ok)) == refs
    assert len(gc.get_objects()) - objects < 50
    assert after - before < 64 * 1024, f"{after - before} bytes kept"
    assert len(freed) == 200 + 10_000 // 3
    assert record.in_flight == 0
    assert dict(record.statuses) == {200: 200 + 3333, 400: 200 + 3333, 203: 200 + 3333}
