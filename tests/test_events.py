"""`/events`: the dashboard's server-sent events, over real sockets, on each loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from app import events
from app.events import Broadcaster
from app.keys import BROADCASTER, MONITOR
from app.launch import ServerThread, eventually, running_server
from app.loops import LoopName
from app.monitor.lag import LagSampler
from app.stats import snapshot

Update = dict[str, Any]


async def updates(response: aiohttp.ClientResponse) -> AsyncIterator[Update]:
    """The `data:` payloads of an SSE response, decoded, in order."""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


async def read_updates(response: aiohttp.ClientResponse, count: int) -> list[Update]:
    got: list[Update] = []
    async for update in updates(response):
        got.append(update)
        if len(got) == count:
            break
    return got


def broadcaster_of(server: ServerThread) -> Broadcaster:
    assert server.server is not None
    return server.server.app[BROADCASTER]


def server_task_count(server: ServerThread) -> int:
    """Tasks alive on the server's own loop, counted on that loop."""
    loop = broadcaster_of(server).loop

    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=10)


def silent_client(url: str, rcvbuf: int | None = None) -> socket.socket:
    """A client that asks for /events and then never reads a byte (no loop reads for it either)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets window
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read what is buffered; True once the server has closed or reset the connection."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def test_stream_carries_live_figures(server: ServerThread, loop_name: LoopName) -> None:
    """Each update names the loop and pid and carries lag, in-flight, connections, rps, steps."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/await?delay=0") as warmup,
        session.get(f"{server.url}/events") as response,
    ):
        assert warmup.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert (await response.content.readline()).decode().strip() == "retry: 1000"
        got = await read_updates(response, 6)
    first, last = got[0], got[-1]
    assert {first["loop"], last["loop"]} == {loop_name}
    assert last["pid"] > 0
    assert len({u["server_id"] for u in got}) == 1  # one server instance behind the stream
    assert set(last["lag_ms"]) == {"p50", "p99", "max"}
    assert last["lag_recent_ms"] >= 0
    assert last["in_flight"] == 0  # the stream itself is not a request in flight
    assert last["connections"]["open"] >= 1  # ...but its TCP connection is open
    assert last["rps"] >= 0
    assert last["longest_step"]["route"] in last["routes"]
    assert "/events" not in last["routes"]
    assert last["dashboards"] == 1
    seqs = [u["seq"] for u in got]
    assert seqs == sorted(set(seqs))  # increasing, no repeats
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(got)]
    # a few updates a second: one per tick, never faster
    assert min(gaps[1:]) >= events.TICK_S * 0.9
    assert statistics.median(gaps[1:]) < events.TICK_S * 4


async def test_stream_pauses_while_the_loop_is_blocked(server: ServerThread) -> None:
    """A /block stops the updates for its whole delay, and the next update reports the lag."""
    delay = 0.6
    async with aiohttp.ClientSession() as session:

        async def watch_during(path: str) -> list[Update]:
            async with session.get(f"{server.url}/events") as response:
                before = await read_updates(response, 2)  # streaming
                request = asyncio.create_task(fetch(session, f"{server.url}{path}?delay={delay}"))
                after = await read_updates(response, int(delay / events.TICK_S) + 6)
                status, _ = await request
                assert status == 200
            return before + after

        blocked = await watch_during("/block")
        awaited = await watch_during("/await")

    def widest_gap(got: list[Update]) -> tuple[float, Update]:
        return max(((b["t"] - a["t"], b) for a, b in itertools.pairwise(got)), key=lambda g: g[0])

    gap, after = widest_gap(blocked)
    assert gap >= delay  # no update could be built while the handler slept on the loop
    # the sampler can only be late from its next due time, at most one interval into the block
    assert after["lag_recent_ms"] >= (delay - LagSampler().interval) * 1000
    await_gap, _ = widest_gap(awaited)
    assert await_gap < delay  # await hands the loop back: the stream keeps flowing


async def test_fifty_clients_some_silent_cost_little_and_leak_nothing(
    loop_name: LoopName,
) -> None:
    """50 streams (15 never read) share one snapshot a tick, keep lag low, leave no tasks behind."""
    with running_server(loop_name) as server:
        broadcaster = broadcaster_of(server)
        await eventually(
            lambda: not broadcaster.subscribers, within=15, what="no dashboards before the test"
        )
        baseline_tasks = server_task_count(server)
        built_before = broadcaster.snapshots_built
        started = time.monotonic()

        silent = [silent_client(server.url) for _ in range(15)]
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True)
            ) as session:
                responses = [await session.get(f"{server.url}/events") for _ in range(35)]
                try:
                    await eventually(
                        lambda: len(broadcaster.subscribers) == 50, within=15, what="50 streams"
                    )
                    # two seconds of updates to every reader, while the silent ones fill up
                    got = await asyncio.gather(*(read_updates(r, 9) for r in responses))
                    assert all(len(g) == 9 for g in got)
                    assert max(u["dashboards"] for g in got for u in g) == 50
                    async with session.get(f"{server.url}/stats") as answer:
                        stats = await answer.json()
                finally:
                    for response in responses:
                        response.close()
        finally:
            for sock in silent:
                sock.close()
        elapsed = time.monotonic() - started

        # one snapshot per tick, shared by all 50: not one per client
        assert broadcaster.snapshots_built - built_before <= elapsed / broadcaster.tick + 2
        # fan-out to 50 streams never stalled the loop (the watchdog threshold here is 0.2 s)
        assert stats["stalls"] == 0
        assert stats["lag_ms"]["max"] < server.settings.stall_threshold * 1000
        assert stats["in_flight"] == 1  # only the /stats request itself: streams are not requests

        await eventually(
            lambda: not broadcaster.subscribers,
            within=15,
            what="every stream to notice its client left",
        )
        await eventually(
            lambda: server_task_count(server) == baseline_tasks,
            within=15,
            what=f"server tasks back to the baseline of {baseline_tasks}",
        )


async def test_a_client_that_stops_reading_is_cut_off(
    loop_name: LoopName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose socket stays full past the write timeout is dropped; others keep flowing."""
    # Fast ticks of padded updates fill the kernel's buffers (Linux grows a socket's send buffer
    # to 4 MiB) in moments instead of many minutes; the mechanism under test is unchanged.
    monkeypatch.setattr(events, "TICK_S", 0.01)
    monkeypatch.setattr(events, "WRITE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(events, "snapshot", lambda app: {**snapshot(app), "padding": "x" * 50_000})
    with running_server(loop_name) as server:
        broadcaster = broadcaster_of(server)
        stuck = silent_client(server.url, rcvbuf=1024)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{server.url}/events") as response,
            ):
                seen: list[Update] = []

                async def keep_reading() -> None:
                    async for update in updates(response):
                        seen.append(update)

                reader = asyncio.create_task(keep_reading())
                await eventually(
                    lambda: len(broadcaster.subscribers) == 2, within=15, what="both streams"
                )
                await eventually(
                    lambda: len(broadcaster.subscribers) == 1,
                    within=15,
                    what="the stuck one cut off",
                )
                assert broadcaster.dropped_total > 0  # its backlog overflowed: old updates dropped
                # the reader never noticed: its updates keep coming, now counting one dashboard
                count = len(seen)
                await eventually(
                    lambda: len(seen) > count + 20 and seen[-1]["dashboards"] == 1,
                    within=15,
                    what="the reader's updates to go on",
                )
                reader.cancel()
            # the cut-off connection is closed by the server, not left half-open
            assert closed_by_server(stuck)
        finally:
            stuck.close()


async def test_shutdown_does_not_wait_for_open_streams(loop_name: LoopName) -> None:
    """Stopping with 30 s of grace ends every stream at once and still drains the demo request."""
    with running_server(loop_name, grace=30.0) as server:
        broadcaster = broadcaster_of(server)
        silent = silent_client(server.url)
        try:
            async with aiohttp.ClientSession() as session:
                stream = await session.get(f"{server.url}/events")
                await eventually(
                    lambda: len(broadcaster.subscribers) == 2, within=15, what="two streams"
                )
                in_flight = asyncio.create_task(fetch(session, f"{server.url}/await?delay=0.5"))
                assert server.server is not None
                routes = server.server.app[MONITOR].routes
                await eventually(
                    lambda: routes.in_flight == 1, within=15, what="the /await in flight"
                )

                started = time.monotonic()
                stopping = asyncio.create_task(asyncio.to_thread(server.stop))
                # the stream ends cleanly (EOF), so EventSource reconnects to the next server
                async for _ in updates(stream):
                    pass
                status, body = await in_flight
                assert status == 200  # the demo request in flight was drained, not cut
                assert body["mode"] == "await"
                stream.close()
                await stopping
                took = time.monotonic() - started
            assert closed_by_server(silent)
        finally:
            silent.close()
    assert took < 10.0, f"stop took {took:.1f} s: the streams held the 30 s grace"


async def test_shutdown_cuts_a_stream_stuck_writing(
    loop_name: LoopName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream blocked on a full socket is aborted at shutdown instead of holding the grace."""
    monkeypatch.setattr(events, "TICK_S", 0.01)
    monkeypatch.setattr(events, "WRITE_TIMEOUT_S", 120.0)  # only shutdown can end this write
    monkeypatch.setattr(events, "snapshot", lambda app: {**snapshot(app), "padding": "x" * 50_000})
    with running_server(loop_name, grace=30.0) as server:
        broadcaster = broadcaster_of(server)
        stuck = silent_client(server.url, rcvbuf=1024)
        try:
            await eventually(
                lambda: any(s.writing for s in broadcaster.subscribers),
                within=15,
                what="a write stuck on a full socket",
            )
            started = time.monotonic()
            await asyncio.to_thread(server.stop)
            took = time.monotonic() - started
            assert closed_by_server(stuck)
        finally:
            stuck.close()
    assert took < 10.0, f"stop took {took:.1f} s: a stuck stream held the 30 s grace"
