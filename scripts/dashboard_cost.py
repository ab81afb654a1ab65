"""What open dashboards cost the server: CPU and loop lag with 0 vs N `/events` clients.

Starts a real `loop-lab serve` per loop on a free loopback port, then for each client count opens
that many `/events` streams (from this process, which reads them all), waits until the server
reports them all connected, and measures the server process's CPU time (/proc/PID/stat) over a fixed
window plus its `/stats` loop lag at the end. Idle (0 clients) is the baseline: the lag sampler and
the broadcaster's own ticks run either way.

    python scripts/dashboard_cost.py --clients 50 --seconds 20

Prints one markdown table row per loop and client count.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `app` importable
    sys.path.insert(0, str(ROOT))

from app.launch import ServerProcess, eventually  # noqa: E402
from app.monitor.process import cpu_seconds  # noqa: E402


async def stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/stats") as response:
        body: dict[str, Any] = await response.json()
        return body


async def measure(url: str, pid: int, clients: int, seconds: float) -> dict[str, Any]:
    received = 0
    dashboards = 0

    async def reader(session: aiohttp.ClientSession) -> None:
        nonlocal received, dashboards
        async with session.get(f"{url}/events") as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    received += 1
                    if b'"dashboards":' in line:
                        dashboards = int(line.split(b'"dashboards":')[1].split(b",")[0])

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(reader(session)) for _ in range(clients)]
        # every stream open before the clock starts
        await eventually(lambda: dashboards >= clients, within=30, what=f"{clients} streams open")
        cpu_before, started, received_before = cpu_seconds(pid) or 0.0, time.monotonic(), received
        await asyncio.sleep(seconds)  # the measurement window itself
        cpu_after, ended = cpu_seconds(pid) or 0.0, time.monotonic()
        after = await stats(session, url)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    window = ended - started
    return {
        "clients": clients,
        "cpu_pct": 100 * (cpu_after - cpu_before) / window,
        "updates_per_client_s": (received - received_before) / window / clients if clients else 0,
        "lag_ms": after["lag_ms"],
        "stalls": after["stalls"],
    }


async def run_loop(loop: str, clients: int, seconds: float) -> list[dict[str, Any]]:
    """One fresh server on `loop`: idle, then with `clients` streams."""
    server = await ServerProcess("--loop", loop).start()
    try:
        return [await measure(server.url, server.pid, n, seconds) for n in (0, clients)]
    finally:
        await server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    args = parser.parse_args()
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    print(
        "| loop | /events clients | server CPU, % of one core | updates/s per client "
        "| lag p50 / p99 / max, ms (last 10 s) | stalls |"
    )
    print("|---|---|---|---|---|---|")
    for loop in loops:
        for row in asyncio.run(run_loop(loop, args.clients, args.seconds)):
            lag = row["lag_ms"]
            print(
                f"| {loop} | {row['clients']} | {row['cpu_pct']:.2f} "
                f"| {row['updates_per_client_s']:.2f} "
                f"| {lag['p50']:g} / {lag['p99']:g} / {lag['max']:g} | {row['stalls']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
