"""Idle and slow clients: a header-read timeout and the keep-alive timeout bound what they hold
(docs/reliability.md, 3)."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from app.config import SettingError, build_settings
from app.keys import MONITOR
from app.launch import eventually, running_server
from app.loops import LoopName
from app.monitor.process import raise_nofile_limit
from tests.reliability_support import http_get, request_bytes

STALLED = 2000
HEADER_TIMEOUT = 1.0
# opening 2,000 connections from the test's own process can take over a second on a busy machine;
# the first ones must not be cut before the last is open
STALLED_HEADER_TIMEOUT = 3.0  # (below the keep-alive timeout, or that closes them first, silently)
KEEPALIVE_TIMEOUT = 3.0


async def _stall(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /await?del")  # half a request line, then nothing
    await writer.drain()
    return reader, writer


async def _closed_after(reader: asyncio.StreamReader, started: float) -> tuple[float, bytes]:
    """Read until the server closes; when (seconds after `started`) and what it sent."""
    data = await reader.read()
    return time.monotonic() - started, data


def test_timeout_settings_parse() -> None:
    """--header-timeout, --keepalive-timeout, --pool-queue parse from flags and env; junk fails."""
    settings = build_settings(
        {"header_timeout": "2.5", "keepalive_timeout": "30"}, {"LOOP_LAB_POOL_QUEUE": "8"}
    )
    assert (settings.header_timeout, settings.keepalive_timeout, settings.pool_queue) == (
        2.5,
        30,
        8,
    )
    with pytest.raises(SettingError, match="--header-timeout"):
        build_settings({"header_timeout": "-1"}, {})
    with pytest.raises(SettingError, match="LOOP_LAB_KEEPALIVE_TIMEOUT"):
        build_settings({}, {"LOOP_LAB_KEEPALIVE_TIMEOUT": "nan"})


async def test_2000_stalled_connections_are_cut_and_probe_stays_fast(loop_name: LoopName) -> None:
    """2,000 half-sent request lines: /healthz answers meanwhile, and every stalled connection
    gets a 408 and is closed once the header timeout passes, not before."""
    raise_nofile_limit()
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    with running_server(
        loop_name,
        header_timeout=STALLED_HEADER_TIMEOUT,
        keepalive_timeout=3 * STALLED_HEADER_TIMEOUT,
    ) as running:
        assert running.server is not None
        port = running.server.port
        monitor = running.server.app[MONITOR]
        try:
            started = time.monotonic()
            stalled = list(await asyncio.gather(*(_stall(port) for _ in range(STALLED))))
            connected = time.monotonic() - started
            closes = [asyncio.create_task(_closed_after(r, started)) for r, _ in stalled]
            await eventually(
                lambda: monitor.connections.open >= STALLED, within=10, what="all open"
            )

            probes = []
            for _ in range(20):
                t0 = time.monotonic()
                status, _, body = await http_get(port, "/healthz")
                probes.append(time.monotonic() - t0)
                assert (status, body) == (200, b"ok")
            still_open = monitor.connections.open

            results = await asyncio.wait_for(asyncio.gather(*closes), 30)
            await eventually(lambda: monitor.connections.open == 0, within=10, what="all closed")
            timeouts = monitor.accept.header_timeouts
        finally:  # a failure must not leave 2,000 sockets to the next test's garbage collection
            for _, writer in stalled:
                writer.close()

    close_times = [t for t, _ in results]
    assert still_open >= STALLED  # the probes were answered while every stalled client held on
    assert max(probes) < STALLED_HEADER_TIMEOUT
    assert min(close_times) >= STALLED_HEADER_TIMEOUT  # nobody was cut early
    assert max(close_times) < connected + STALLED_HEADER_TIMEOUT + 3.0  # all were cut, promptly
    assert all(data.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for _, data in results)
    assert timeouts >= STALLED
    print(
        f"\n[{loop_name}] {STALLED} stalled: /healthz p50 {statistics.median(probes) * 1000:.1f} ms"
        f" max {max(probes) * 1000:.1f} ms; closed after {min(close_times):.2f}-"
        f"{max(close_times):.2f}s (connecting took {connected:.2f}s)"
    )


async def test_trickle_idle_and_silent_connections(loop_name: LoopName) -> None:
    """A header trickled a byte at a time is cut at the header timeout; a silent connection is
    closed then without a response; an idle keep-alive connection lasts until keepalive_timeout."""
    with running_server(
        loop_name, header_timeout=HEADER_TIMEOUT, keepalive_timeout=KEEPALIVE_TIMEOUT
    ) as running:
        assert running.server is not None
        port = running.server.port

        async def trickle() -> tuple[float, bytes, int]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started, sent = time.monotonic(), 0
            close = asyncio.create_task(_closed_after(reader, started))
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                if close.done():
                    break
                writer.write(bytes([byte]))
                sent += 1
                await asyncio.sleep(0.05)
            took, data = await close
            writer.close()
            return took, data, sent

        async def silent() -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            result = await _closed_after(reader, time.monotonic())
            writer.close()
            return result

        async def idle_after_response() -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes("/healthz", keep_alive=True))
            head = await reader.readuntil(b"\r\n\r\nok")
            assert head.startswith(b"HTTP/1.1 200")
            result = await _closed_after(reader, time.monotonic())
            writer.close()
            return result

        (t_trickle, d_trickle, sent), (t_silent, d_silent), (t_idle, d_idle) = await asyncio.gather(
            trickle(), silent(), idle_after_response()
        )

    # the server starts its clock on accept, a little before open_connection returns here
    early = 0.05
    assert HEADER_TIMEOUT - early <= t_trickle < HEADER_TIMEOUT + 1.5
    assert d_trickle.startswith(b"HTTP/1.1 408")
    assert sent > 10  # it was sending all along: progress does not reset the clock
    assert HEADER_TIMEOUT - early <= t_silent < HEADER_TIMEOUT + 1.5
    assert d_silent == b""  # nothing was asked, so nothing is answered
    assert KEEPALIVE_TIMEOUT - early <= t_idle < KEEPALIVE_TIMEOUT + 1.5
    assert d_idle == b""
    print(
        f"\n[{loop_name}] trickle cut {t_trickle:.2f}s, silent {t_silent:.2f}s, idle {t_idle:.2f}s"
    )
