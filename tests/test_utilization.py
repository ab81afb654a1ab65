"""Loop utilisation by cause and stalls with causes, on both loops, against real servers."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from app.keys import MONITOR
from app.launch import ServerProcess, ServerThread, eventually, running_server
from app.loops import LOOP_NAMES, LoopName
from app.monitor.frames import request_route
from app.monitor.utilization import SYSCALLS, Sample, explain, proc_available
from app.monitor.watchdog import StallWatchdog

pytestmark = pytest.mark.skipif(not proc_available(), reason="needs Linux /proc per-thread files")


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


def _in_flight(server: ServerThread, route: str) -> bool:
    assert server.server is not None
    return server.server.app[MONITOR].routes.in_flight_by_route().get(route, 0) > 0


def _largest(by_cause: dict[str, float]) -> str:
    return max(by_cause, key=lambda cause: by_cause[cause])


async def _stall(session: aiohttp.ClientSession, url: str, over_ms: float) -> dict[str, Any]:
    """The latest stall longer than `over_ms` (the lag tick after a stall records it)."""
    found: list[dict[str, Any]] = []

    async def recorded() -> bool:
        stalls = (await _json(session, f"{url}/stats"))["stalls_recent"]
        found[:] = [s for s in stalls if s["duration_ms"] > over_ms]
        return bool(found)

    await eventually(recorded, within=10, what=f"a stall over {over_ms} ms in stalls_recent")
    return found[-1]


def test_syscall_table_covers_both_architectures() -> None:
    """x86_64 and aarch64 both name the selector calls, futex and clock_nanosleep."""
    for table in SYSCALLS.values():
        assert table.selector
        assert table.futex in table.names
        assert "clock_nanosleep" in table.names.values()
        assert {"epoll_pwait", "epoll_pwait2", "ppoll"} <= {table.names[n] for n in table.selector}


def test_a_stall_names_the_line_most_samples_saw() -> None:
    """A gap the sampler could not see into names no line; the line most samples saw is named."""
    burn = [
        Sample(0.1 + i * 0.005, 0.005, "cpu", None, "app/cpu.py:24", "l", "/cpu", 0.0)
        for i in range(60)
    ]
    gap = Sample(0.995, 0.6, "cpu", None, None, "l", None, 0.0)
    after = Sample(1.0, 0.005, "cpu", None, "app/launch.py:235", "l", None, 0.0)
    told = explain([*burn, gap, after], [], 0.0, 1.0)
    assert (told.cause, told.where, told.route) == ("cpu", "app/cpu.py:24", "/cpu")
    longer = after._replace(t=1.05, dt=0.05)  # longer than any one burn sample, shorter than all
    assert explain([*burn, longer], [], 0.0, 1.1).where == "app/cpu.py:24"


async def test_idle_server_is_idle() -> None:
    """An idle server's last 10 s (start-up out of the window) stay under 0.05, no GIL share."""
    servers = await asyncio.gather(*(ServerProcess("--loop", loop).start() for loop in LOOP_NAMES))
    try:
        async with aiohttp.ClientSession() as session:

            async def idle_for_10s(server: ServerProcess) -> dict[str, Any]:
                util: dict[str, Any] = {}

                async def settled() -> bool:  # 10 s of sampling: start-up has left the window
                    stats = await _json(session, f"{server.url}/stats")
                    util.update(stats["utilization"])
                    return bool(stats["utilization"]["samples"] > 11 * 50)

                await eventually(settled, within=40, interval=1.0, what="10 s of samples")
                return util

            utils = await asyncio.gather(*(idle_for_10s(server) for server in servers))
    finally:
        await asyncio.gather(*(server.stop() for server in servers))
    for util in utils:
        # what a busy machine adds (the loop runnable, its turns waiting for a core) is not the
        # server's own work: reported apart, and left out here
        assert util["last_10s"] - util["waiting_for_cpu"]["last_10s"] < 0.05, util
        assert util["by_cause"]["gil"] < 0.01, util


async def test_block_is_syscall_at_blocking_py(server: ServerThread) -> None:
    """During /block?delay=2 last_1s > 0.9, syscall largest; its stall names app/blocking.py."""
    async with aiohttp.ClientSession() as session:
        block = asyncio.create_task(_json(session, f"{server.url}/block?delay=2"))
        await eventually(lambda: _in_flight(server, "/block"), within=5, what="/block running")
        stats = await _json(session, f"{server.url}/stats")  # answered as the block ends
        await block
        stall = await _stall(session, server.url, 1500)
    util = stats["utilization"]
    assert util["last_1s"] > 0.9, util
    assert _largest(util["by_cause_1s"]) == "syscall", util
    assert _largest(util["by_cause"]) == "syscall", util
    assert stall["cause"] == "syscall", stall
    assert stall["detail"] == "clock_nanosleep"
    assert stall["where"].startswith("app/blocking.py:"), stall
    assert stall["route"] == "/block"
    assert stall["started_s"] > 0


async def test_cpu_inline_is_cpu_at_cpu_py(server: ServerThread) -> None:
    """/cpu?via=inline with a large n is cpu, and its stall names app/cpu.py."""
    async with aiohttp.ClientSession() as session:
        # about a second on a quiet core: /stats (queued behind it) then sees a loop busy all along
        burn = asyncio.create_task(_json(session, f"{server.url}/cpu?via=inline&n=20000000"))
        await eventually(lambda: _in_flight(server, "/cpu"), within=5, what="/cpu running")
        stats = await _json(session, f"{server.url}/stats")
        answer = await burn
        stall = await _stall(session, server.url, 0.5 * answer["max_step_ms"])
        metrics = await _metrics(session, server.url)
    util = stats["utilization"]
    assert _largest(util["by_cause_1s"]) == "cpu", util
    assert util["by_cause_1s"]["cpu"] > 0.5, util
    assert stall["cause"] == "cpu", stall
    assert stall["where"].startswith("app/cpu.py:"), stall
    assert stall["route"] == "/cpu"
    assert metrics[("looplab_loop_stalls_total", "cpu")] >= 1
    # the burn's own step is counted as cpu time
    assert metrics[("looplab_loop_busy_seconds_total", "cpu")] > 0.8 * answer["max_step_ms"] / 1000
    assert 0 < metrics[("looplab_loop_utilization", "")] <= 1


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        (sample.name, sample.labels.get("cause", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(("looplab_loop_stalls", "looplab_loop_busy", "looplab_loop_util"))
    }


async def test_cpu_in_a_thread_shows_as_gil(server: ServerThread) -> None:
    """/cpu?via=thread: the loop waits for the GIL held by the worker (named), an idle one not."""
    async with aiohttp.ClientSession() as session:
        idle = (await _json(session, f"{server.url}/stats"))["utilization"]
        burn = asyncio.create_task(_json(session, f"{server.url}/cpu?via=thread&n=20000000"))
        await eventually(lambda: _in_flight(server, "/cpu"), within=5, what="/cpu running")
        busy: dict[str, Any] = {}

        async def gil_seen() -> bool:
            busy.update((await _json(session, f"{server.url}/stats"))["utilization"])
            return bool(busy["by_cause_1s"]["gil"] > 0.05)

        await eventually(gil_seen, within=20, interval=0.2, what="a GIL share")
        await burn
    assert idle["by_cause"]["gil"] < 0.01, idle
    assert busy["by_cause_1s"]["gil"] > max(0.05, 5 * idle["by_cause"]["gil"]), busy
    assert server.server is not None
    util = server.server.app[MONITOR].utilization
    holders = {s.thread for s in util.samples() if s.cause == "gil"}
    assert any(name and name.startswith("looplab-offload") for name in holders), holders


async def test_full_collection_stall_is_gc(loop_name: LoopName) -> None:
    """A full collection over millions of objects run on the loop thread is a `gc` stall."""
    # 3 million lists take a quiet core about 0.2 s to walk: a 50 ms threshold leaves a margin
    with running_server(loop_name, stall_threshold=0.05) as server:
        assert server.server is not None
        monitor = server.server.app[MONITOR]
        loop = monitor.lag.loop
        gc.disable()  # no collection of this thread's own while it makes the garbage
        try:
            garbage = [[i] for i in range(3_000_000)]  # containers the collector has to walk
        finally:
            gc.enable()
        made = time.monotonic()
        await eventually(lambda: monitor.lag.heartbeat > made, within=10, what="a lag tick")
        ticked = monitor.lag.heartbeat  # one more: the tick before it has recorded any stall
        await eventually(lambda: monitor.lag.heartbeat > ticked, within=10, what="another tick")
        try:
            before = monitor.watchdog.stalls if monitor.watchdog is not None else 0
            loop.call_soon_threadsafe(gc.collect)
            await eventually(
                lambda: monitor.watchdog is not None and monitor.watchdog.stalls > before,
                within=30,
                what="the collection's stall",
            )
            async with aiohttp.ClientSession() as session:
                stall = await _stall(session, server.url, 100)
                metrics = await _metrics(session, server.url)
        finally:
            del garbage  # freeing 3 million lists holds the GIL too: after the figures are read
        assert stall["cause"] == "gc", stall
        assert stall["thread"] == "looplab-server"  # the loop thread collected
        assert metrics[("looplab_loop_stalls_total", "gc")] >= 1
        assert metrics[("looplab_loop_busy_seconds_total", "gc")] > 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_thousand_awaits_leave_headroom(loop: str) -> None:
    """1,000 concurrent /await requests: the second while all of them wait is under 0.5 busy."""
    server = await ServerProcess("--loop", loop).start()
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                # 3 s: a whole second of sampling falls after the last one arrived
                async with session.get(f"{server.url}/await?delay=3") as response:
                    assert response.status == 200
                    await response.read()

            waiting = [asyncio.create_task(one()) for _ in range(1000)]
            stats: dict[str, Any] = {}

            async def all_in_flight() -> bool:
                stats.update(await _json(session, f"{server.url}/stats"))
                return bool(stats["in_flight"] >= 1000)

            await eventually(all_in_flight, within=10, interval=0.05, what="1,000 in flight")
            arrived = stats["utilization"]["samples"]

            async def a_second_of_waiting() -> bool:  # ~50 samples at the sampler's 50 a second
                stats.update(await _json(session, f"{server.url}/stats"))
                return bool(stats["utilization"]["samples"] >= arrived + 50)

            await eventually(a_second_of_waiting, within=10, interval=0.1, what="1 s of samples")
            still_waiting = stats["in_flight"]
            await asyncio.gather(*waiting)
    finally:
        await server.stop()
    assert still_waiting >= 1000  # the second measured is one in which all 1,000 waited
    util = stats["utilization"]
    assert util["last_1s"] - util["waiting_for_cpu"]["last_1s"] < 0.5, util


def test_a_stall_at_startup_starts_at_zero_not_before() -> None:
    """A stall reaching back before the server started is placed at 0.0 s (never -0.0)."""
    started = time.monotonic()
    watchdog = StallWatchdog(
        heartbeat=lambda: started,
        threshold=0.2,
        loop_thread_id=0,
        in_flight_routes=dict,
        started=started,
    )
    entry = watchdog.stall_ended(started - 1.0, 1.5, started + 0.5)
    assert json.dumps(entry["started_s"]) == "0.0"
    assert entry["cause"] == "unknown"  # no sampler: nothing is guessed
    assert watchdog.recent_stalls() == [entry]


async def test_the_sampler_can_be_turned_off() -> None:
    """`--utilization-interval 0`: no sampler thread, /stats utilization is null."""
    server = await ServerProcess("--utilization-interval", "0").start()
    try:
        async with aiohttp.ClientSession() as session:
            stats = await _json(session, f"{server.url}/stats")
    finally:
        await server.stop()
    assert stats["utilization"] is None


def test_a_request_not_routed_yet_has_no_route() -> None:
    """A sampled frame holding a request the router has not seen (the guard screens heads first)
    gives no route, and no exception that would end the sampler's thread."""
    request = make_mocked_request("CONNECT", "/")
    request._match_info = None  # as aiohttp makes a request, before routing it
    assert request_route(sys._getframe()) is None
