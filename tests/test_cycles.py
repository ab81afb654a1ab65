"""Served requests leave no reference cycles behind: what they used is freed by refcounting.

A cycle is only freed by a garbage-collector pass, and under `--gc tuned` the objects that survive
two young passes wait for a rare full one: a cycle per refused request (aiohttp keeps a raised
HTTPException in a local of the frame its traceback holds) or per connection (CPython 3.11's
selector transport holds a bound method of itself) piled up megabytes per flood of 503s.
The client here is plain blocking sockets, which make no cycles of their own.
"""

from __future__ import annotations

import gc
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from app.keys import MONITOR
from app.launch import ServerThread, running_server
from app.loops import LoopName

# what the server's side of a request is made of; the test's own objects are none of these
REQUESTS = 20  # per run, each on its own connection
SERVER_MODULES = ("aiohttp.", "app.", "asyncio.", "uvloop", "multidict", "yarl")


def _server_garbage(garbage: list[object]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for obj in garbage:
        kind = type(obj)
        if kind.__module__.startswith(SERVER_MODULES):
            kinds[f"{kind.__module__}.{kind.__qualname__}"] += 1
        elif kind.__name__ == "frame":
            kinds[f"frame {obj.f_code.co_filename.rsplit('/', 2)[-2:]}"] += 1  # type: ignore[attr-defined]
    return kinds


@contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """Collects what became cyclic garbage inside the block (gc.DEBUG_SAVEALL keeps it)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[object] = []
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _exchange(port: int, paths: list[str], *, read: bool = True) -> list[int]:
    """Sends every request at once on its own connection (Connection: close); their statuses."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in paths]
    for sock, path in zip(socks, paths, strict=True):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    statuses = []
    for sock in socks:
        with sock:
            if not read:
                continue
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
            statuses.append(int(raw.split(b" ", 2)[1]))
    return statuses


def _wait_idle(server: ServerThread, accepted: int) -> None:
    """Until the server has accepted `accepted` connections in all, closed every one of them and
    finished every request."""
    assert server.server is not None
    monitor = server.server.app[MONITOR]
    deadline = time.monotonic() + 30
    while (
        monitor.connections.accepted_total < accepted
        or monitor.connections.open
        or sum(monitor.routes.in_flight_by_route().values())
    ):
        assert time.monotonic() < deadline, "server did not go idle"
        time.sleep(0.01)


def _port(server: ServerThread) -> int:
    assert server.server is not None
    return server.server.port


CASES: dict[str, tuple[Callable[[ServerThread], list[int]], set[int]]] = {
    "200 await": (lambda s: _exchange(_port(s), ["/await?delay=0"] * REQUESTS), {200}),
    "400 bad param": (lambda s: _exchange(_port(s), ["/await?delay=nan"] * REQUESTS), {400}),
    "404 no route": (lambda s: _exchange(_port(s), ["/nope"] * REQUESTS), {404}),
    "503 pool full": (lambda s: _exchange(_port(s), ["/offload?delay=0.3"] * REQUESTS), {200, 503}),
    "client aborts": (
        lambda s: _exchange(_port(s), ["/await?delay=5"] * REQUESTS, read=False),
        set(),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_requests_leave_no_cycles(loop_name: LoopName, case: str) -> None:
    """Answered, refused and aborted requests free everything without a garbage-collector pass."""
    run, expected = CASES[case]
    with running_server(loop_name, thread_workers=1, pool_queue=1) as server:
        run(server)  # warm-up: first-use caches are not per-request garbage
        _wait_idle(server, accepted=REQUESTS)
        with cyclic_garbage() as garbage:
            statuses = set(run(server))
            _wait_idle(server, accepted=2 * REQUESTS)
    assert statuses == expected
    assert _server_garbage(garbage) == Counter(), "requests left reference cycles"
    gc.collect()  # anything left unclosed warns here, in this test, not in a later one
