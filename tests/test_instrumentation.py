"""The request middleware in the app: every request metered, 404/405 counted, histograms whole."""

from __future__ import annotations

import asyncio

import aiohttp
import yarl
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from app.application import create_app
from app.config import Settings
from app.events import events_handler
from app.health import healthz_handler
from app.keys import MONITOR
from app.launch import ServerThread
from app.monitor.middleware import UNMATCHED
from app.monitor.steps import current_max_step_ms


async def test_one_middleware_and_untouched_routes(server: ServerThread) -> None:
    """The monitor is the app's first middleware; every route keeps its own handler."""
    assert server.server is not None
    app = server.server.app
    monitor = app[MONITOR]
    assert app.middlewares[0] is monitor.middleware
    assert getattr(monitor.middleware, "__middleware_version__", None) == 1  # @web.middleware
    handlers = {
        route.resource.canonical: route.handler
        for route in app.router.routes()
        if route.resource is not None
    }
    assert handlers["/events"] is events_handler
    assert handlers["/healthz"] is healthz_handler


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
    app.router.add_view("/view", _View)
    runner = web.AppRunner(app, access_log=None)
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
