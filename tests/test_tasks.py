"""/tasks: live tasks grouped by the line they wait at, on both loops, against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from app.launch import ServerThread, eventually

IN_FLIGHT = 300


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def test_tasks_group_waiting_requests_at_their_line(server: ServerThread) -> None:
    """300 /await requests in flight are one group at app/awaiting.py, made by /await."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        waiting = [
            asyncio.create_task(_json(session, f"{server.url}/await?delay=5"))
            for _ in range(IN_FLIGHT)
        ]
        try:

            async def all_in_flight() -> bool:
                stats = await _json(session, f"{server.url}/stats")
                return bool(stats["in_flight"] >= IN_FLIGHT)

            await eventually(all_in_flight, within=20, interval=0.05, what="all in flight")
            body = await _json(session, f"{server.url}/tasks")
            detail = await _json(session, f"{server.url}/tasks?detail=1&limit=5")
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
    top = next(group for group in body["groups"] if group["project"])
    assert top["where"].startswith("app/awaiting.py:")
    assert top["line"] == "await asyncio.sleep(delay)"
    assert top["count"] == IN_FLIGHT
    assert top["created_by"] == "/await"
    assert top["oldest_s"] > 0
    assert body["summary"] == f"{IN_FLIGHT} tasks at {top['where']} `{top['line']}`"
    assert body["total"] >= IN_FLIGHT
    assert body["ended"] == 0  # every task waits: none ends before the walk reaches it
    counts = [group["count"] for group in body["groups"]]
    assert counts == sorted(counts, reverse=True)  # largest groups first
    listed = detail["tasks"]
    assert len(listed) == 5
    awaiting = [t for t in listed if t["where"] == top["where"]]
    assert awaiting, listed
    assert any(step.startswith("app/awaiting.py:") for step in awaiting[0]["await_chain"])
    assert {"name", "coro", "age_s", "created_by"} <= set(awaiting[0])


async def test_tasks_rejects_bad_detail(server: ServerThread) -> None:
    """?detail=2 and ?limit=0 are 400s naming the parameter and its bound."""
    async with aiohttp.ClientSession() as session:
        for query, param in (("detail=2", "detail"), ("detail=x", "detail"), ("limit=0", "limit")):
            async with session.get(f"{server.url}/tasks?{query}") as response:
                assert response.status == 400
                body = await response.json()
            assert body["param"] == param
            assert "<=" in body["allowed"]
