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

from app.loops import LOOP_NAMES, LoopName
from tests.postgres_outage import CUT, DRIVERS, server_on_cluster, stop_under_queries, timed_get


async def measure(loop_name: LoopName) -> list[str]:
    rows = []
    with server_on_cluster(loop_name) as (cluster, server):
        async with aiohttp.ClientSession() as session:
            cut = await stop_under_queries(session, server, cluster)
            for driver, (status, seconds, _) in zip(CUT, cut, strict=True):
                rows.append(
                    f"| {loop_name} | {driver} | cut mid-query | {status} | {seconds:.2f} |"
                )
            for driver in DRIVERS:
                status, seconds, _ = await timed_get(
                    session, f"{server.url}/db?driver={driver}&delay=0"
                )
                rows.append(f"| {loop_name} | {driver} | while down | {status} | {seconds:.2f} |")
            await asyncio.get_running_loop().run_in_executor(None, cluster.start)
            restarted = time.perf_counter()
            for driver in DRIVERS:
                url = f"{server.url}/db?driver={driver}&delay=0"
                # polling another process's state: there is no event here to wait on
                while (await timed_get(session, url))[0] != 200:  # noqa: ASYNC110
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
