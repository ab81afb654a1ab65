"""A PostgreSQL outage under a loop-lab server, step by step, in one copy: tests/test_database.py
asserts on the answers, scripts/db_outage.py times them for docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp

from app.launch import ServerThread, running_server
from app.loops import LoopName
from app.pgcluster import Cluster, throwaway_cluster
from tests.loop_contrasts import wait_in_flight

DRIVERS = ("sync", "offload", "async")
CONNECT_TIMEOUT = 2.0  # libpq's smallest connect_timeout
QUERY_TIMEOUT = 5.0
CUT = ("offload", "async")  # the drivers whose queries are in flight when PostgreSQL stops

Answer = tuple[int, float, Any]  # status, seconds, JSON body


async def timed_get(session: aiohttp.ClientSession, url: str) -> Answer:
    started = time.perf_counter()
    async with session.get(url) as response:
        body = await response.json()
        return response.status, time.perf_counter() - started, body


@contextmanager
def server_on_cluster(loop_name: LoopName) -> Iterator[tuple[Cluster, ServerThread]]:
    """A throwaway PostgreSQL cluster and a loop-lab server using it, with short timeouts."""
    with (
        throwaway_cluster() as cluster,
        running_server(
            loop_name,
            database_url=cluster.url,
            db_connect_timeout=CONNECT_TIMEOUT,
            db_query_timeout=QUERY_TIMEOUT,
        ) as server,
    ):
        yield cluster, server


async def stop_under_queries(
    session: aiohttp.ClientSession, server: ServerThread, cluster: Cluster
) -> list[Answer]:
    """Warm every driver's pool, put a 3 s query of each CUT driver in flight, stop PostgreSQL
    under them; their answers, in CUT's order."""
    for driver in DRIVERS:
        await timed_get(session, f"{server.url}/db?driver={driver}&delay=0")
    in_flight = [
        asyncio.create_task(timed_get(session, f"{server.url}/db?driver={d}&delay=3")) for d in CUT
    ]
    await wait_in_flight(server, "/db", len(CUT))
    await asyncio.sleep(0.3)  # let both queries reach PostgreSQL; not a readiness wait
    await asyncio.get_running_loop().run_in_executor(None, cluster.stop)
    return list(await asyncio.gather(*in_flight))
