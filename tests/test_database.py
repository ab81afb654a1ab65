"""/db on both loops, against SQLite and a real PostgreSQL: the blocking driver freezes the loop,
the offloaded and async ones do not; a PostgreSQL outage is a 503 and heals by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from app.database import display_url
from app.launch import ServerThread, running_server
from app.loops import LoopName
from app.pgcluster import Cluster
from tests.loop_contrasts import concurrent, get_json, healthz_latency_during
from tests.postgres_outage import (
    CONNECT_TIMEOUT,
    DRIVERS,
    QUERY_TIMEOUT,
    server_on_cluster,
    stop_under_queries,
    timed_get,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.host)])
def db_server(request: pytest.FixtureRequest, loop_name: LoopName) -> Iterator[ServerThread]:
    """A loop-lab server whose /db is SQLite (the default) or the session's PostgreSQL."""
    overrides: dict[str, Any] = {}
    if request.param == "postgresql":
        cluster: Cluster = request.getfixturevalue("postgres")
        overrides["database_url"] = cluster.url
    with running_server(loop_name, **overrides) as server:
        yield server


async def test_ten_sync_queries_serialise(db_server: ServerThread) -> None:
    """10 concurrent /db?driver=sync&delay=0.2 run one after another: at least 1.9 s."""
    elapsed, bodies = await concurrent(f"{db_server.url}/db?driver=sync&delay=0.2", 10)
    assert elapsed >= 1.9
    assert all(body["rows"] == 10 for body in bodies)


@pytest.mark.parametrize("driver", ["offload", "async"])
async def test_ten_offloaded_or_async_queries_overlap(db_server: ServerThread, driver: str) -> None:
    """10 concurrent offloaded or async queries of 0.2 s overlap: well under a second."""
    elapsed, bodies = await concurrent(f"{db_server.url}/db?driver={driver}&delay=0.2", 10)
    assert elapsed < 1.0
    assert {body["driver"] for body in bodies} == {driver}


async def test_sync_query_starves_healthz(db_server: ServerThread) -> None:
    """A /healthz sent during a blocking query waits for the query to end."""
    latency = await healthz_latency_during(db_server, "/db?driver=sync&delay=0.6", "/db")
    assert latency > 0.3


@pytest.mark.parametrize("driver", ["offload", "async"])
async def test_offloaded_or_async_query_leaves_healthz_alone(
    db_server: ServerThread, driver: str
) -> None:
    """A /healthz sent during an offloaded or async query is answered at once."""
    latency = await healthz_latency_during(db_server, f"/db?driver={driver}&delay=0.6", "/db")
    assert latency < 0.15


async def test_max_step_names_the_blocking_driver(db_server: ServerThread) -> None:
    """A sync query's max_step_ms is its whole delay, an async one's a few ms; /stats blames /db."""
    async with aiohttp.ClientSession() as session:
        sync = await get_json(session, f"{db_server.url}/db?driver=sync&delay=0.25")
        async_ = await get_json(session, f"{db_server.url}/db?driver=async&delay=0.25")
        stats = await get_json(session, f"{db_server.url}/stats")
    assert sync["max_step_ms"] >= 245
    assert async_["max_step_ms"] < sync["max_step_ms"] / 10
    assert stats["longest_step"]["route"] == "/db"
    assert stats["routes"]["/db"]["max_step_ms"] >= 245


async def test_response_says_what_ran(db_server: ServerThread) -> None:
    """The response names the database and the exact queries it ran."""
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{db_server.url}/db?driver=async&delay=0.01")
    assert body["database"] in ("sqlite", "postgresql")
    sleep = "pg_sleep(0.01)" if body["database"] == "postgresql" else "sleep(0.01)"
    assert sleep in body["query"][0]
    assert body["rows"] == 10
    assert "@" not in body["where"] or ":" not in body["where"].split("@")[0].split("//")[1]


def test_display_url_drops_the_password() -> None:
    """A database URL shown in a response or a 503 never carries its password."""
    shown = display_url("postgresql://app:s3cret@127.0.0.1:5432/shop")
    assert shown == "postgresql://app@127.0.0.1:5432/shop"


async def _eventually_ok(session: aiohttp.ClientSession, url: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        status, _, body = await timed_get(session, url)
        if status == 200:
            return
        assert status == 503, body
        assert time.monotonic() < deadline, f"{url} still 503 after {within} s: {body}"
        await asyncio.sleep(0.2)


@pytest.mark.host
async def test_postgres_outage_is_a_503_and_heals(loop_name: LoopName) -> None:
    """PostgreSQL stopped mid-query: 503 naming it, within the timeouts; restarted: 200 again."""
    with server_on_cluster(loop_name) as (cluster, server):
        async with aiohttp.ClientSession() as session:
            # offloaded and async queries in flight when the server goes down
            for status, seconds, body in await stop_under_queries(session, server, cluster):
                assert status == 503, body
                assert seconds < 3, "a query cut by the outage waited out its delay"
                assert "postgresql" in body["database"]
            # while it is down: every driver answers 503 within the connect timeout
            limit = CONNECT_TIMEOUT + QUERY_TIMEOUT + 1.0
            for driver in DRIVERS:
                status, seconds, body = await timed_get(
                    session, f"{server.url}/db?driver={driver}&delay=0"
                )
                assert status == 503, body
                assert seconds < limit
                assert body["driver"] == driver
                assert str(cluster.port) in body["database"]
            await asyncio.get_running_loop().run_in_executor(None, cluster.start)
            for driver in DRIVERS:
                await _eventually_ok(session, f"{server.url}/db?driver={driver}&delay=0", 30)


@pytest.mark.host
async def test_postgres_query_timeout_is_a_503(postgres: Cluster) -> None:
    """A query longer than --db-query-timeout is cancelled by the server: 503, not a hang."""
    with running_server(
        "asyncio", database_url=postgres.url, db_query_timeout=0.5, db_pool_size=2
    ) as server:
        async with aiohttp.ClientSession() as session:
            for driver in DRIVERS:
                status, seconds, body = await timed_get(
                    session, f"{server.url}/db?driver={driver}&delay=3"
                )
                assert status == 503, body
                assert seconds < 2.5
                assert "cancel" in body["error"].lower() or "timeout" in body["error"].lower()
