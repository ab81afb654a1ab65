"""Instructions per request under valgrind's callgrind: a meter that other load hardly moves.

A shared VM's rps swings 10-30% between rounds; the instructions a server executes for a request
do not. The server runs under callgrind; after warm-up, each path gets a batch of N1 and a batch of
N2 keep-alive requests, and after each batch callgrind is asked for a dump (the instructions since
the one before): (batch N2 - batch N1) / (N2 - N1) is one request, the dumps and the idle moments
between batches cancelled out; the server's clock-driven work is counted apart (`PerRequest`).
Used by scripts/instructions.py (loop-lab vs bare aiohttp) and `loop-lab matrix` (each
interpreter x loop).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

WARMUP = 200  # requests per path before the first batch: first-use caches are not per request
IDLE_S = 5.0  # seconds of no requests, to see what the server does on a clock
# `loop-lab serve` under valgrind, which runs it ~50x slower: every clock runs 50x slower too, so
# its work per request is what it is at full speed. `--gc tuned` collects on a clock: CPython's
# own collector instead, as bare servers have it; the utilisation sampler and the lag sampler
# every 1 s, not 20 ms; the watchdog checks every 6.25 s (a quarter of the threshold), not 125 ms.
SERVE_ARGS = (
    "--gc",
    "default",
    "--utilization-interval",
    "1.0",
    "--lag-interval",
    "1.0",
    "--stall-threshold",
    "25",
)

_SUMMARY = re.compile(r"^summary: (\d+)$", re.M)


class MeterError(RuntimeError):
    """The server under callgrind answered wrongly, or a dump could not be read."""


def dump_count(dump: str) -> int:
    """The instruction count of one callgrind dump (its `summary:` line)."""
    match = _SUMMARY.search(dump)
    if match is None:
        raise MeterError(f"no 'summary:' line in the callgrind dump:\n{dump[:500]}")
    return int(match.group(1))


def per_request(count_small: int, count_large: int, small: int, large: int) -> float:
    """Instructions one request costs: the difference of two batches over their request counts."""
    if large <= small:
        raise ValueError("the second batch must send more requests than the first")
    return (count_large - count_small) / (large - small)


async def _keep_alive_client(host: str, port: int, path: str, requests: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    try:
        for _ in range(requests):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise MeterError(f"{path}: {head.splitlines()[0]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
    finally:
        writer.close()


async def send_requests(url: str, path: str, requests: int, connections: int) -> None:
    """`requests` GETs of `path`, spread over `connections` keep-alive connections, like wrk."""
    host, _, port = url.removeprefix("http://").partition(":")
    share, extra = divmod(requests, connections)
    await asyncio.gather(
        *(
            _keep_alive_client(host, int(port), path, share + (1 if i < extra else 0))
            for i in range(connections)
        )
    )


@dataclass(frozen=True)
class PerRequest:
    """One path's instructions per request, as counted and without the clock's share.

    Work done on a timer or by a thread (the lag sampler, the watchdog) counts in proportion to
    wall time, which valgrind stretches ~50x (more on a loaded machine): `unclocked` takes out the
    server's idle rate x each batch's wall time, leaving what the requests themselves cost.
    """

    counted: float
    unclocked: float


async def per_request_counts(
    url: str,
    batches: dict[str, tuple[int, int]],
    connections: int,
    dump: Callable[[], Awaitable[int]],
    idle_s: float = IDLE_S,
) -> tuple[float, dict[str, PerRequest]]:
    """The server's instructions per idle second, and each path's instructions per request.

    `dump()` returns the count since the last one. Every path is warmed up first (up to N1
    requests), so first-use work lands in no batch; then `idle_s` seconds without requests show
    what the server does on a clock.
    """
    for path, (small, _) in batches.items():
        await send_requests(url, path, min(WARMUP, small), connections)
    await dump()
    started = time.monotonic()
    await asyncio.sleep(idle_s)
    clock_per_s = await dump() / (time.monotonic() - started)
    figures = {}
    for path, (small, large) in batches.items():
        counts, clocked = [], []
        for requests in (small, large):
            started = time.monotonic()
            await send_requests(url, path, requests, connections)
            counts.append(await dump())
            clocked.append(round(clock_per_s * (time.monotonic() - started)))
        figures[path] = PerRequest(
            counted=per_request(counts[0], counts[1], small, large),
            unclocked=per_request(counts[0] - clocked[0], counts[1] - clocked[1], small, large),
        )
    return clock_per_s, figures
