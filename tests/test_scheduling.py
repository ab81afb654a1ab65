"""/schedule reports the loop's real callback order; /threadsafe crosses threads correctly."""

from __future__ import annotations

from typing import Any

import aiohttp

from app.launch import ServerThread


async def _json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_schedule_reports_every_callback_once_in_loop_time_order(
    server: ServerThread, loop_name: str
) -> None:
    """All five callbacks ran exactly once, numbered in the order their loop times say."""
    body = await _json(f"{server.url}/schedule")
    ran = body["ran"]
    assert sorted(r["callback"] for r in ran) == sorted(body["registration_order"])
    assert [r["order"] for r in ran] == [1, 2, 3, 4, 5]
    times = [r["loop_time"] for r in ran]
    assert times == sorted(times)
    assert all(r["loop_time"] >= body["registered_at"] for r in ran)
    assert body["loop"] == loop_name


async def test_schedule_asyncio_runs_ready_queue_before_io_before_timers() -> None:
    """On asyncio, call_soon and create_task run first, then the I/O callback, then timers."""
    from app.launch import running_server

    with running_server("asyncio") as server:
        body = await _json(f"{server.url}/schedule")
    order = [r["callback"] for r in body["ran"]]
    assert order[:2] == ["create_task", "call_soon"]
    assert order[2] == "I/O callback (add_reader)"
    assert set(order[3:]) == {"call_later(0)", "call_at(loop.time())"}


async def test_threadsafe_runs_the_coroutine_on_the_loop_thread(server: ServerThread) -> None:
    """The worker thread is a pool thread; the coroutine it submitted ran on the loop's thread."""
    body = await _json(f"{server.url}/threadsafe?delay=0.05")
    assert body["worker_thread"].startswith("looplab-offload")
    assert body["coroutine_thread"] == body["loop_thread"]
    assert body["coroutine_thread"] != body["worker_thread"]
    assert body["worker_waited_s"] >= 0.045  # libuv timers have millisecond resolution
