"""The monitor in the app: every route metered, 404/405 counted, histograms whole."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
import yarl
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from app.application import create_app
from app.config import Settings
from app.events import events_handler
from app.health import healthz_handler
from app.keys import MONITOR
from app.launch import ServerThread
from app.monitor import metering, monitor
from app.monitor.metering import UNMATCHED
from app.monitor.steps import current_max_step_ms


async def test_every_route_metered_and_no_middleware(server: ServerThread) -> None:
    """Each route's handler is its module's handler metered (/events as it is); no middleware."""
    assert server.server is not None
    app = server.server.app
    assert not app.middlewares  # any middleware costs aiohttp's machinery on every request
    assert metering.unmetered_routes(app) == []
    handlers = {
        (route.method, route.resource.canonical): route.handler
        for route in app.router.routes()
        if route.resource is not None
    }
    assert handlers[("GET", "/events")] is events_handler
    assert handlers[("GET", "/healthz")] is not healthz_handler
    assert getattr(handlers[("GET", "/healthz")], "__wrapped__", None) is healthz_handler
    assert handlers[("HEAD", "/healthz")] is handlers[("GET", "/healthz")]
    canonicals = [resource.canonical for resource in app.router.resources()]
    assert len(canonicals) == len(set(canonicals))  # one resource per path, GET and HEAD on it


async def test_a_route_added_around_the_monitor_stops_startup() -> None:
    """A route registered past monitor.add_routes fails the startup, naming the route."""
    app = create_app(Settings(port=0, process_workers=1, thread_workers=1))
    app.router.add_get("/sneaky", healthz_handler)
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="routes not metered: HEAD /sneaky, GET /sneaky;"):
        await runner.setup()
    await runner.cleanup()


async def test_static_files_are_served_and_metered(server: ServerThread) -> None:
    """The dashboard's files come from a metered handler: counted under /static/{name}."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/static/dashboard.js") as response:
            assert response.status == 200
            assert "javascript" in response.content_type
        async with session.get(f"{server.url}/static/nope.js") as response:
            assert response.status == 404
        async with session.get(f"{server.url}/static/..%2Fconfig.py") as response:
            assert response.status == 404
        async with session.get(f"{server.url}/stats") as response:
            routes = (await response.json())["routes"]
    assert routes["/static/{name}"]["count"] == 3
    assert "unmatched" not in routes


async def test_streams_are_not_metered(server: ServerThread) -> None:
    """/events is left out of the request figures; the requests around it are counted."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/events") as response:
            assert response.status == 200
            await response.content.readline()  # the stream has begun
        async with session.get(f"{server.url}/stats") as response:
            routes = (await response.json())["routes"]
    assert "/events" not in routes
    assert routes["/stats"]["in_flight"] == 1  # this request, counted


async def test_unmatched_requests_and_histograms(server: ServerThread) -> None:
    """404 and 405 go to route "unmatched"; each histogram's +Inf bucket equals its count."""
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"{server.url}/healthz") as response:
                assert response.status == 200
        async with session.get(f"{server.url}/no-such-page") as response:
            assert response.status == 404
        async with session.post(f"{server.url}/healthz") as response:
            assert response.status == 405
        async with session.get(f"{server.url}/await?delay=-1") as response:
            assert response.status == 400
        async with session.get(f"{server.url}/stats") as response:
            routes = (await response.json())["routes"]
        async with session.get(f"{server.url}/metrics") as response:
            text = await response.text()
    assert routes["unmatched"]["count"] == 2
    assert routes["/healthz"]["count"] == 3
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["looplab_requests"].samples
        if s.name == "looplab_requests_total"
    }
    assert requests[("unmatched", "404")] == 1
    assert requests[("unmatched", "405")] == 1
    assert requests[("/healthz", "200")] == 3
    assert requests[("/await", "400")] == 1
    for name in ("looplab_request_duration_seconds", "looplab_handler_step_seconds"):
        samples = families[name].samples
        count = {s.labels["route"]: s.value for s in samples if s.name == f"{name}_count"}
        inf = {
            s.labels["route"]: s.value
            for s in samples
            if s.name == f"{name}_bucket" and s.labels["le"] == "+Inf"
        }
        assert count == inf
        assert count["/healthz"] == 3
        buckets = [
            s.value
            for s in samples
            if s.name == f"{name}_bucket" and s.labels["route"] == "/healthz"
        ]
        assert buckets == sorted(buckets)  # cumulative


class _View(web.View):
    async def get(self) -> web.Response:
        await asyncio.sleep(0)
        return web.json_response({"max_step_ms": current_max_step_ms(self.request)})


async def test_unmatched_answers_as_aiohttp_does(server: ServerThread) -> None:
    """404, or 405 with aiohttp's Allow header, as aiohttp answers; each counts as unmatched."""
    cases = [
        ("GET", "/no-such-page", 404, None),
        ("HEAD", "/no-such-page", 404, None),
        ("GET", "/a%0Ab", 404, None),  # a decoded newline in the path
        ("GET", "/healthz/", 404, None),
        ("POST", "/healthz", 405, "GET,HEAD"),
        ("PUT", "/", 405, "GET,HEAD"),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, status, allow in cases:
            url = yarl.URL(f"{server.url}{path}", encoded=True)
            async with session.request(method, url) as response:
                assert (response.status, response.headers.get("Allow")) == (status, allow), path
        async with session.get(f"{server.url}/stats") as response:
            routes = (await response.json())["routes"]
    assert routes["unmatched"]["count"] == len(cases)
    assert server.server is not None
    assert dict(server.server.app[MONITOR].routes.by_route[UNMATCHED].statuses) == {404: 4, 405: 2}


async def test_class_based_views_are_metered() -> None:
    """A web.View route is driven step by step and counted like a function handler."""
    app = create_app(Settings(port=0, process_workers=1, thread_workers=1))
    monitor.add_routes(app, [web.view("/view", _View)])
    runner = web.AppRunner(app, access_log=None)  # the app's handler_args still count 404s
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/view") as response,
        ):
            assert response.status == 200
            body = await response.json()
        assert 0 < body["max_step_ms"] < 1000
        routes = app[MONITOR].routes.as_dict()
        assert routes["/view"]["count"] == 1
    finally:
        await runner.cleanup()


async def test_access_log_lines_beside_the_unmatched_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With --access-log, aiohttp's line is written for every request; 404s are still counted."""
    app = create_app(Settings(port=0, process_workers=1, thread_workers=1, access_log=True))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        with caplog.at_level(logging.INFO, logger="aiohttp.access"):
            async with aiohttp.ClientSession() as session:
                for path in ("/healthz", "/no-such-page"):
                    async with session.get(f"{url}{path}") as response:
                        await response.read()
        lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
        assert any('"GET /healthz HTTP/1.1" 200' in line for line in lines), lines
        assert any('"GET /no-such-page HTTP/1.1" 404' in line for line in lines), lines
        assert dict(app[MONITOR].routes.by_route[UNMATCHED].statuses) == {404: 1}
    finally:
        await runner.cleanup()
