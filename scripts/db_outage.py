"""PostgreSQL stopped under loop-lab and started again: what each /db driver answers, how fast.

Starts a throwaway cluster (app.pgcluster) and a loop-lab server on each loop, puts an offloaded
and an async query in flight, stops PostgreSQL (fast shutdown), asks every driver while it is
down, starts it again and times each driver's first 200. Prints a Markdown table.

    python scripts/db_outage.py
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from app.launch import running_server
from app.loops import LOOP_NAMES, LoopName
from app.pgcluster import throwaway_cluster
from tests.loop_contrasts import wait_in_flight

DRIVERS = ("sync", "offload", "async")
CONNECT_TIMEOUT, QUERY_TIMEOUT = 2.0, 5.0


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        return response.status, time.perf_counter() - started


async def measure(loop_name: LoopName) -> list[str]:
    rows = []
    with (
        throwaway_cluster() as cluster,
        running_server(
            loop_name,
            database_url=cluster.url,
            db_connect_timeout=CONNECT_TIMEOUT,
            db_query_timeout=QUERY_TIMEOUT,
        ) as server,
    ):
        run = asyncio.get_running_loop().run_in_executor
        async with aiohttp.ClientSession() as session:
            for driver in DRIVERS:
                await _get(session, f"{server.url}/db?driver={driver}&delay=0")
            cut = [
                asyncio.create_task(_get(session, f"{server.url}/db?driver={d}&delay=3"))
                for d in ("offload", "async")
            ]
            await wait_in_flight(server, "/db", 2)
            await asyncio.sleep(0.3)  # let both queries reach PostgreSQL
            await run(None, cluster.stop)
            for driver, (status, seconds) in zip(
                ("offload", "async"), await asyncio.gather(*cut), strict=True
            ):
                rows.append(
                    f"| {loop_name} | {driver} | cut mid-query | {status} | {seconds:.2f} |"
                )
            for driver in DRIVERS:
                status, seconds = await _get(session, f"{server.url}/db?driver={driver}&delay=0")
                rows.append(f"| {loop_name} | {driver} | while down | {status} | {seconds:.2f} |")
            await run(None, cluster.start)
            restarted = time.perf_counter()
            for driver in DRIVERS:
                # polling another process's state: there is no event here to wait on
                while (await _get(session, f"{server.url}/db?driver={driver}&delay=0"))[0] != 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
                waited = time.perf_counter() - restarted
                rows.append(
                    f"| {loop_name} | {driver} | first 200 after restart | 200 | {waited:.2f} |"
                )
    return rows


def main() -> None:
    print("| loop | driver | when | status | seconds |")
    print("|---|---|---|---:|---:|")
    for loop_name in LOOP_NAMES:
        for row in asyncio.run(measure(loop_name)):
            print(row)


if __name__ == "__main__":
    main()
