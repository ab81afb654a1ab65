"""The monitor: lag, steps, connections, watchdog, /stats and /metrics."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.launch import ServerThread, running_server
from app.monitor.lag import LagSampler
from app.percentiles import percentile

DESIGN_METRICS = {
    "looplab_loop_lag_seconds": "histogram",
    "looplab_requests": "counter",  # exposed as looplab_requests_total
    "looplab_request_duration_seconds": "histogram",
    "looplab_handler_step_seconds": "histogram",
    "looplab_in_flight_requests": "gauge",
    "looplab_open_connections": "gauge",
    "looplab_loop_info": "gauge",
}


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_stats_shape(server: ServerThread, loop_name: str) -> None:
    """/stats has every DESIGN.md key and names the loop by its real class."""
    async with aiohttp.ClientSession() as session:
        stats = await _json(session, f"{server.url}/stats")
    for key in ("loop", "pid", "uptime_s", "lag_ms", "in_flight", "connections", "routes"):
        assert key in stats
    assert stats["loop"] == loop_name
    assert set(stats["lag_ms"]) >= {"p50", "p99", "max"}
    assert set(stats["connections"]) >= {"open", "peak", "accepted_total"}
    assert set(stats["executor"]) == {"thread", "process", "default"}  # default: the loop's own
    assert set(stats["executor"]["thread"]) == {"workers", "busy", "queued"}
    assert stats["rss_mb"] > 0


async def test_stats_lag_reflects_a_block(server: ServerThread) -> None:
    """After a 300 ms /block, /stats lag max is at least about 300 ms; before, it is small."""
    async with aiohttp.ClientSession() as session:
        before = await _json(session, f"{server.url}/stats")
        await _json(session, f"{server.url}/block?delay=0.3")
        after = await _json(session, f"{server.url}/stats")
    assert before["lag_ms"]["max"] < 100
    assert after["lag_ms"]["max"] >= 250
    assert after["routes"]["/block"]["max_step_ms"] >= 290
    assert after["longest_step"]["route"] == "/block"


async def test_connections_are_real_connections(server: ServerThread) -> None:
    """Connections are TCP connections: 5 keep-alive connections x 4 requests = 5 accepted."""
    connector = aiohttp.TCPConnector(limit=5)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(4):
            await asyncio.gather(
                *(_json(session, f"{server.url}/await?delay=0.05") for _ in range(5))
            )
        stats = await _json(session, f"{server.url}/stats")
    assert stats["connections"]["accepted_total"] == 5
    assert stats["connections"]["peak"] == 5
    assert stats["connections"]["open"] == 5
    assert stats["routes"]["/await"]["count"] == 20


async def test_metrics_parse_and_have_every_design_name(server: ServerThread) -> None:
    """/metrics parses with prometheus_client's parser and exports every DESIGN.md metric."""
    async with aiohttp.ClientSession() as session:
        await _json(session, f"{server.url}/block?delay=0.01")
        async with session.get(f"{server.url}/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in DESIGN_METRICS.items():
        assert name in families, name
        assert families[name].type == kind, name
    steps = [
        s for s in families["looplab_handler_step_seconds"].samples if s.name.endswith("_count")
    ]
    assert any(s.labels["route"] == "/block" for s in steps)
    requests = families["looplab_requests"].samples
    assert any(s.labels == {"route": "/block", "status": "200"} for s in requests)
    info = families["looplab_loop_info"].samples
    assert len(info) == 1
    assert info[0].value == 1


def test_watchdog_names_the_route_holding_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """A block longer than the stall threshold logs one warning with /block and its stack."""
    caplog.set_level(logging.WARNING, logger="loop_lab.watchdog")
    with (
        running_server("asyncio", stall_threshold=0.1) as server,
        socket.create_connection(
            (server.server.host, server.server.port)  # type: ignore[union-attr]
        ) as conn,
    ):
        conn.sendall(b"GET /block?delay=0.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"200 OK" in conn.recv(65536)
    stalls = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stalls) == 1
    message = stalls[0].getMessage()
    assert "/block x1" in message
    assert "time.sleep" in message or "block_handler" in message


def test_percentile_nearest_rank() -> None:
    """percentile() is nearest-rank: p50 of 1..100 is 50, p99 is 99, empty is 0."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.99) == 0.0


async def test_lag_sampler_measures_a_stall() -> None:
    """A 200 ms synchronous stall shows up as about 200 ms of lag."""
    sampler = LagSampler(interval=0.01)
    sampler.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.2)
        await asyncio.sleep(0.05)
    finally:
        sampler.stop()
    summary = sampler.summary()
    assert 190 <= summary.max_ms < 400
    assert summary.p50_ms < 20
