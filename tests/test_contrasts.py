"""The contrasts the service exists to show, on both loops, over real sockets."""

from __future__ import annotations

import aiohttp

from app.launch import ServerThread
from tests.loop_contrasts import concurrent, get_json, healthz_latency_during


async def test_ten_blocks_serialise(server: ServerThread) -> None:
    """10 concurrent /block?delay=0.2 run one after another: about 10x one, at least 1.9 s."""
    elapsed, bodies = await concurrent(f"{server.url}/block?delay=0.2", 10)
    assert elapsed >= 1.9
    assert all(body["mode"] == "block" for body in bodies)


async def test_ten_awaits_overlap(server: ServerThread) -> None:
    """10 concurrent /await?delay=0.2 overlap on one loop: well under a second in total."""
    elapsed, _ = await concurrent(f"{server.url}/await?delay=0.2", 10)
    assert elapsed < 1.0


async def test_ten_thread_offloads_overlap(server: ServerThread) -> None:
    """10 concurrent /offload?pool=thread overlap in the pool: well under a second."""
    elapsed, bodies = await concurrent(f"{server.url}/offload?delay=0.2&pool=thread", 10)
    assert elapsed < 1.0
    assert {body["pool"] for body in bodies} == {"thread"}


async def test_process_offloads_leave_loop_free(server: ServerThread) -> None:
    """/offload?pool=process runs in another process and keeps the handler's steps short."""
    _, bodies = await concurrent(f"{server.url}/offload?delay=0.2&pool=process", 2)
    for body in bodies:
        assert body["worker"].split()[1] != str(body["pid"])
        assert body["max_step_ms"] < 50


async def test_healthz_starved_by_block(server: ServerThread) -> None:
    """A /healthz sent while /block holds the loop waits for the block to end."""
    latency = await healthz_latency_during(server, "/block?delay=0.6", "/block")
    assert latency > 0.3


async def test_healthz_not_starved_by_await(server: ServerThread) -> None:
    """A /healthz sent during an /await is answered at once."""
    latency = await healthz_latency_during(server, "/await?delay=0.6", "/await")
    assert latency < 0.15


async def test_healthz_not_starved_by_offload(server: ServerThread) -> None:
    """A /healthz sent during an /offload is answered at once."""
    latency = await healthz_latency_during(server, "/offload?delay=0.6", "/offload")
    assert latency < 0.15


async def test_gather_takes_the_max_not_the_sum(server: ServerThread) -> None:
    """/gather of 50 tasks of 0.2 s takes about 0.2 s, not 10 s."""
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{server.url}/gather?n=50&delay=0.2")
    assert body["sum_of_delays"] == 10.0
    assert 0.19 <= body["elapsed"] < 0.6


async def test_block_step_is_its_delay(server: ServerThread) -> None:
    """/block's max_step_ms is about its delay: the handler never yielded while sleeping."""
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{server.url}/block?delay=0.25")
    assert 245 <= body["max_step_ms"] < 400


async def test_await_step_is_tiny(server: ServerThread) -> None:
    """/await's max_step_ms is a few ms at most: it yields while it waits."""
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{server.url}/await?delay=0.25")
    assert body["max_step_ms"] < 5
    assert body["elapsed"] >= 0.245  # libuv rounds timers to whole milliseconds


async def test_cpu_inline_holds_the_loop_process_does_not(server: ServerThread) -> None:
    """/cpu inline shows one long step; via=process keeps the handler's steps short."""
    async with aiohttp.ClientSession() as session:
        inline = await get_json(session, f"{server.url}/cpu?n=2000000&via=inline")
        process = await get_json(session, f"{server.url}/cpu?n=2000000&via=process")
    assert inline["checksum"] == process["checksum"]
    assert inline["max_step_ms"] >= 0.8 * inline["elapsed"] * 1000
    assert process["max_step_ms"] < 0.5 * process["elapsed"] * 1000
