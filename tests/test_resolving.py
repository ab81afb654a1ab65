"""/resolve on both loops, and the default executor's size and load in /stats."""

from __future__ import annotations

import aiohttp

from app.launch import ServerThread, running_server
from app.loops import LoopName
from tests.loop_contrasts import get_json


async def test_resolve_reports_each_call(server: ServerThread) -> None:
    """/resolve?n=20 says where the lookups ran and how long each one queued."""
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{server.url}/resolve?n=20")
    assert len(body["queued_ms"]) == 20
    assert all(q >= 0 for q in body["queued_ms"])
    expected = "libuv" if body["loop"] == "uvloop" else "default executor"
    assert expected in body["runs_in"]


async def test_stats_shows_the_default_executor(loop_name: LoopName) -> None:
    """/stats' executor block has the loop's default executor, sized by the setting."""
    with running_server(loop_name, default_executor_workers=3) as server:
        async with aiohttp.ClientSession() as session:
            stats = await get_json(session, f"{server.url}/stats")
    assert stats["executor"]["default"] == {"workers": 3, "busy": 0, "queued": 0}
    assert set(stats["executor"]) >= {"thread", "process", "default"}


async def test_lookups_delay_other_users_of_the_default_executor() -> None:
    """asyncio: with one default-executor thread, a job behind 300 lookups waits for them all."""
    with running_server("asyncio", default_executor_workers=1) as server:
        async with aiohttp.ClientSession() as session:
            alone = await get_json(session, f"{server.url}/resolve?n=1")
            crowded = await get_json(session, f"{server.url}/resolve?n=300")
    # a lookup costs tens of microseconds in the worker: 300 of them queue for many solo calls
    assert crowded["bystander_wait_ms"] > 5 * alone["bystander_wait_ms"]
    assert crowded["bystander_wait_ms"] > 10 * crowded["solo_ms"]
    assert max(crowded["queued_ms"]) > 10 * crowded["solo_ms"]
