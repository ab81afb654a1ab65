"""/upstream on both loops: `requests` on the loop freezes it, aiohttp and offloaded `requests`
do not; an upstream that is down is a 503."""

from __future__ import annotations

import aiohttp
import pytest

from app.launch import ServerThread, free_port, running_server
from tests.loop_contrasts import concurrent, get_json, healthz_latency_during


async def test_ten_requests_calls_serialise(server: ServerThread) -> None:
    """10 concurrent /upstream?client=requests&delay=0.2 run one after another: at least 1.9 s."""
    elapsed, bodies = await concurrent(f"{server.url}/upstream?client=requests&delay=0.2", 10)
    assert elapsed >= 1.9
    assert all(body["answer"]["delay"] == 0.2 for body in bodies)


@pytest.mark.parametrize("client", ["aiohttp", "offload"])
async def test_ten_async_or_offloaded_calls_overlap(server: ServerThread, client: str) -> None:
    """10 concurrent aiohttp or offloaded `requests` calls of 0.2 s overlap: under a second."""
    elapsed, bodies = await concurrent(f"{server.url}/upstream?client={client}&delay=0.2", 10)
    assert elapsed < 1.0
    assert {body["client"] for body in bodies} == {client}


async def test_requests_on_the_loop_starves_healthz(server: ServerThread) -> None:
    """A /healthz sent during a blocking `requests` call waits for the call to end."""
    latency = await healthz_latency_during(
        server, "/upstream?client=requests&delay=0.6", "/upstream"
    )
    assert latency > 0.3


@pytest.mark.parametrize("client", ["aiohttp", "offload"])
async def test_async_client_leaves_healthz_alone(server: ServerThread, client: str) -> None:
    """A /healthz sent during an aiohttp or offloaded call is answered at once."""
    latency = await healthz_latency_during(
        server, f"/upstream?client={client}&delay=0.6", "/upstream"
    )
    assert latency < 0.15


async def test_max_step_names_requests(server: ServerThread) -> None:
    """`requests` on the loop: max_step_ms is the call's delay; aiohttp: a few ms."""
    async with aiohttp.ClientSession() as session:
        blocking = await get_json(session, f"{server.url}/upstream?client=requests&delay=0.25")
        nonblocking = await get_json(session, f"{server.url}/upstream?client=aiohttp&delay=0.25")
        stats = await get_json(session, f"{server.url}/stats")
    assert blocking["max_step_ms"] >= 245
    assert nonblocking["max_step_ms"] < blocking["max_step_ms"] / 10
    assert stats["longest_step"]["route"] == "/upstream"


async def test_upstream_is_not_this_server(server: ServerThread) -> None:
    """The upstream runs on its own port and loop: `requests` against this loop would deadlock."""
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{server.url}/upstream?client=requests&delay=0")
    assert not body["upstream"].startswith(server.url + "/")


@pytest.mark.parametrize("client", ["requests", "aiohttp", "offload"])
async def test_upstream_down_is_a_503(client: str) -> None:
    """An upstream nobody listens on: 503 JSON naming it and the client, not a 500."""
    dead = f"http://127.0.0.1:{free_port()}"
    with running_server("asyncio", upstream_url=dead, upstream_timeout=2.0) as server:
        async with aiohttp.ClientSession() as session:
            body = await get_json(session, f"{server.url}/upstream?client={client}", status=503)
    assert body["upstream"] == dead
    assert body["client"] == client
    assert body["error"].startswith("upstream unavailable")
