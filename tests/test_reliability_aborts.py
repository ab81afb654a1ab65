"""Client abort storm: clients that hang up mid-request leave nothing behind
(docs/reliability.md, 2)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from app.keys import EXECUTORS, MONITOR
from app.launch import ServerThread, eventually, running_server
from app.loops import LoopName
from app.monitor.process import raise_nofile_limit
from tests.reliability_support import http_get, open_fds, request_bytes

CLIENTS = 1000
THREAD_WORKERS = 8


def _server_tasks(running: ServerThread) -> int:
    """Tasks alive on the server's loop, counted on that loop."""

    async def count() -> int:
        return len(asyncio.all_tasks())

    loop = running._loop  # the test helper's own loop: no public handle to it
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=10)


def _footprint(running: ServerThread) -> dict[str, int]:
    return {
        "tasks": _server_tasks(running),
        "threads": threading.active_count(),
        "fds": open_fds(),
    }


async def _settled(running: ServerThread) -> None:
    """Wait until the server holds no request, connection or pool job."""
    assert running.server is not None
    app = running.server.app
    monitor, executors = app[MONITOR], app[EXECUTORS]
    await eventually(
        lambda: (
            monitor.routes.in_flight == 0
            and monitor.connections.open == 0
            and executors.thread.pending == 0
            and executors.process.pending == 0
        ),
        within=30,
        what="server idle",
    )


async def _client(port: int, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    await asyncio.get_running_loop().sock_sendall(sock, request_bytes(path))
    return sock


async def test_abort_storm_leaks_nothing(loop_name: LoopName) -> None:
    """1,000 clients hang up mid-/await and mid-/offload: in-flight drops to 0 long before the
    requests would have finished, and tasks, threads and fds return to their baseline."""
    raise_nofile_limit()
    with running_server(
        loop_name, thread_workers=THREAD_WORKERS, pool_queue=CLIENTS, max_delay=60.0
    ) as running:
        assert running.server is not None
        port = running.server.port
        monitor = running.server.app[MONITOR]
        # warm up: every pool worker started, every lazy import done
        warm = [f"/offload?delay=0.05&pool={p}" for p in ["thread"] * THREAD_WORKERS + ["process"]]
        await asyncio.gather(*(http_get(port, p) for p in [*warm, "/await?delay=0", "/stats"]))
        await _settled(running)
        before = _footprint(running)

        paths = ["/await?delay=30"] * (CLIENTS // 2) + ["/offload?delay=1"] * (CLIENTS // 2)
        socks = list(await asyncio.gather(*(_client(port, p) for p in paths)))
        await eventually(lambda: monitor.routes.in_flight == CLIENTS, within=30, what="all in")
        for i, sock in enumerate(socks):
            if i % 2:  # half hang up with a reset, half with a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        back_to_zero = await eventually(
            lambda: monitor.routes.in_flight == 0, within=30, what="in-flight back to 0"
        )
        await _settled(running)
        after = _footprint(running)
        statuses = monitor.routes.as_dict()

    assert back_to_zero < 5.0  # the /await handlers were cancelled, not left to sleep 30 s
    assert after["tasks"] <= before["tasks"], (before, after)
    assert after["threads"] <= before["threads"], (before, after)
    assert after["fds"] <= before["fds"], (before, after)
    assert statuses["/await"]["in_flight"] == statuses["/offload"]["in_flight"] == 0
    print(
        f"\n[{loop_name}] {CLIENTS} aborts: in-flight 0 after {back_to_zero:.2f}s;", before, after
    )


async def test_aborted_threadsafe_frees_its_worker(loop_name: LoopName) -> None:
    """A client that hangs up mid-/threadsafe frees the pool thread waiting for the loop at once,
    not when the coroutine's delay is over."""
    with running_server(loop_name, thread_workers=2) as running:
        assert running.server is not None
        port = running.server.port
        pool = running.server.app[EXECUTORS].thread
        socks = [await _client(port, "/threadsafe?delay=30") for _ in range(2)]
        await eventually(lambda: pool.busy == 2, within=30, what="both workers waiting")
        for sock in socks:
            sock.close()
        freed = await eventually(lambda: pool.pending == 0, within=10, what="workers freed")
        await _settled(running)
        # the pool serves again: its threads are not stuck behind the cancelled waits
        status, _, _ = await http_get(port, "/threadsafe?delay=0", within=5)
    assert status == 200
    assert freed < 5.0
