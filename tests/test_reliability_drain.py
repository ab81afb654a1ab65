"""Graceful drain of a real `python -m app serve` process on SIGTERM (docs/reliability.md, 1)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from app.launch import ServerProcess, eventually
from app.loops import LoopName
from app.monitor.process import raise_nofile_limit
from tests.reliability_support import get_json, parse_response, request_bytes

pytestmark = pytest.mark.slow

IN_FLIGHT = 1000
AWAIT_DELAY = 3.0
OFFLOAD_DELAY = 0.5
THREAD_WORKERS = 100  # --thread-workers bounds offload concurrency: 500 jobs run in 5 waves


async def _send(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes(path))
    await writer.drain()
    return reader, writer


async def _sigterm_past_grace(
    server: ServerProcess,
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    grace: float,
) -> tuple[list[bytes], int, float]:
    """SIGTERM, then what each client read to EOF, the exit code and seconds until exit."""
    signalled = time.monotonic()
    server.signal()
    # a reset would raise ConnectionResetError here; a clean close reads b""
    raw = await asyncio.wait_for(
        asyncio.gather(*(reader.read() for reader, _ in clients)), grace + 10
    )
    code = await server.wait(within=grace + 10)
    return list(raw), code, time.monotonic() - signalled


async def _demo_in_flight(port: int) -> int:
    routes = (await get_json(port, "/stats"))["routes"]
    return sum(routes.get(r, {}).get("in_flight", 0) for r in ("/await", "/offload"))


async def _all_in_flight(port: int, expected: int) -> None:
    async def reached() -> bool:
        return await _demo_in_flight(port) == expected

    await eventually(reached, within=30, what=f"{expected} requests in flight")


async def test_sigterm_drains_1000_in_flight_requests(loop_name: LoopName) -> None:
    """SIGTERM with 1,000 /await + /offload in flight: all answered 200, new connections
    refused while draining, exit 0 before the grace period ends."""
    raise_nofile_limit()
    grace = 20.0
    server = await ServerProcess(
        "--loop",
        loop_name,
        "--thread-workers",
        str(THREAD_WORKERS),
        "--pool-queue",
        str(IN_FLIGHT),
        "--grace",
        str(grace),
    ).start()
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        paths = [f"/await?delay={AWAIT_DELAY}"] * (IN_FLIGHT // 2)
        paths += [f"/offload?delay={OFFLOAD_DELAY}"] * (IN_FLIGHT // 2)
        clients = list(await asyncio.gather(*(_send(server.port, p) for p in paths)))
        await _all_in_flight(server.port, IN_FLIGHT)
        responses = [asyncio.create_task(reader.read()) for reader, _ in clients]

        signalled = time.monotonic()
        server.signal()
        await server.wait_for_line("draining: ", within=10)
        # the listening socket is closed the moment draining starts
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.port)
        assert not all(task.done() for task in responses), "drain began after all had finished"

        raw = await asyncio.wait_for(asyncio.gather(*responses), grace)
        code = await server.wait(within=grace)
        took = time.monotonic() - signalled
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()

    statuses = [parse_response(r)[0] for r in raw]
    assert statuses.count(200) == IN_FLIGHT, f"lost: {IN_FLIGHT - statuses.count(200)}"
    modes = [json.loads(parse_response(r)[2])["mode"] for r in raw]
    assert modes.count("await") == modes.count("offload") == IN_FLIGHT // 2
    assert code == 0
    assert took < grace
    assert "0 requests cut at the end of the grace period" in server.log
    print(f"\n[{loop_name}] drained {IN_FLIGHT} in-flight requests; exit 0 after {took:.2f}s")


async def test_grace_deadline_cuts_and_counts_the_rest(loop_name: LoopName) -> None:
    """Requests still running when the grace period ends get a clean close (EOF, no reset),
    the log counts them, and the process exits soon after the deadline, pools included."""
    grace = 1.0
    server = await ServerProcess(
        "--loop", loop_name, "--grace", str(grace), "--thread-workers", "4"
    ).start()
    paths = ["/await?delay=30"] * 6
    paths += ["/offload?delay=30"] * 6  # 4 running in threads, 2 queued
    paths += ["/offload?delay=30&pool=process"] * 2
    clients = []
    try:
        clients = list(await asyncio.gather(*(_send(server.port, p) for p in paths)))
        await _all_in_flight(server.port, len(paths))
        raw, code, took = await _sigterm_past_grace(server, clients, grace)
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()
    assert raw == [b""] * len(paths)
    assert code == 0
    assert grace <= took < grace + 5, took  # not the 30 s the sleeping workers asked for
    assert f"closing {len(paths)} requests still running" in server.log
    assert f"{len(paths)} requests cut at the end of the grace period" in server.log
    print(f"\n[{loop_name}] cut {len(paths)} requests at a {grace}s grace; exit after {took:.2f}s")


async def test_grace_deadline_frees_threadsafe_workers(loop_name: LoopName) -> None:
    """/threadsafe requests still running at the grace deadline do not hold the process for
    their delay: their worker threads' waits are cancelled and the server exits soon after."""
    grace = 1.0
    server = await ServerProcess(
        "--loop", loop_name, "--grace", str(grace), "--thread-workers", "4"
    ).start()
    paths = ["/threadsafe?delay=30"] * 4  # every pool thread waits on a 30 s coroutine
    clients = []
    try:
        clients = list(await asyncio.gather(*(_send(server.port, p) for p in paths)))

        async def all_waiting() -> bool:
            stats = await get_json(server.port, "/stats")
            return bool(
                stats["routes"].get("/threadsafe", {}).get("in_flight", 0) == len(paths)
                and stats["executor"]["thread"]["busy"] == len(paths)
            )

        await eventually(all_waiting, within=30, what="threadsafe workers waiting")
        raw, code, took = await _sigterm_past_grace(server, clients, grace)
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()
    assert raw == [b""] * len(paths)
    assert code == 0
    assert grace <= took < grace + 5, took  # not the 30 s the coroutines asked for
    assert f"{len(paths)} requests cut at the end of the grace period" in server.log
    print(
        f"\n[{loop_name}] cut {len(paths)} /threadsafe at a {grace}s grace; exit after {took:.2f}s"
    )
