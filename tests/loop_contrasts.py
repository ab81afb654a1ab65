"""Timing helpers for the contrasts: n concurrent requests, and /healthz while one is in flight."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from app.keys import MONITOR
from app.launch import ServerThread, eventually


async def get_json(session: aiohttp.ClientSession, url: str, status: int = 200) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == status, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def concurrent(url: str, count: int) -> tuple[float, list[dict[str, Any]]]:
    """`count` truly concurrent GETs (one connection each): total seconds and the bodies."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        bodies = await asyncio.gather(*(get_json(session, url) for _ in range(count)))
        return time.perf_counter() - started, list(bodies)


async def wait_in_flight(server: ServerThread, route: str, count: int = 1) -> None:
    """Poll the server's own route table (same process) until `route` is being handled."""
    assert server.server is not None
    routes = server.server.app[MONITOR].routes
    await eventually(
        lambda: routes.in_flight_by_route().get(route, 0) >= count,
        within=10,
        what=f"{route} in flight",
        interval=0.005,
    )


async def healthz_latency_during(server: ServerThread, path: str, route: str) -> float:
    """Seconds a /healthz takes while `path` is being handled."""
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(get_json(session, f"{server.url}{path}"))
        await wait_in_flight(server, route)
        started = time.perf_counter()
        async with session.get(f"{server.url}/healthz") as response:
            assert response.status == 200
        latency = time.perf_counter() - started
        await slow
        return latency
