"""Measure /tasks and the utilisation sampler idle and at 10,000 connections, on one loop.

Starts a server, reads its sampler's own CPU time over an idle stretch, then runs
`loop-lab bench multiplex --users 10000` against it while polling /stats and /tasks every
`--poll` seconds: the largest project task group against the requests in flight, the walk's
time off the loop and the handler's time on it, and the sampler's CPU under load. Prints one
JSON document (docs/utilization.md quotes it). Hold the bench lock:

    flock /tmp/looplab-bench.lock .venv/bin/python scripts/why_at_10k.py --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from app.launch import ROOT, ServerProcess, child_env


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        body: dict[str, Any] = await response.json()
        return body


async def measure(
    loop: str, idle_s: float, poll: float, out: Path, with_tasks: bool
) -> dict[str, Any]:
    server = await ServerProcess("--loop", loop, nofile=20_000).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            first = await _json(session, f"{server.url}/stats")
            t0 = time.monotonic()
            await asyncio.sleep(idle_s)  # the idle stretch measured, not a wait for readiness
            idle = await _json(session, f"{server.url}/stats")
            idle_cpu = idle["utilization"]["sampler_cpu_s"] - first["utilization"]["sampler_cpu_s"]
            idle_wall = time.monotonic() - t0
            bench = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "bench", "multiplex", "--users", "10000",
                "--delay", "10", "--target", server.url, "--out", str(out), "--no-progress",
                cwd=ROOT, env=child_env(), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            polls: list[dict[str, Any]] = []
            loaded: list[tuple[float, float]] = []  # (monotonic, sampler cpu) at >= 9,900 in flight
            while bench.returncode is None:
                stats = await _json(session, f"{server.url}/stats")
                if with_tasks:
                    tasks = await _json(session, f"{server.url}/tasks")
                else:  # the control run: the same load, no /tasks
                    tasks = {"groups": [], "total": 0, "build_ms": 0.0, "loop_ms": 0.0}
                after = await _json(session, f"{server.url}/stats")
                top = next((g for g in tasks["groups"] if g["project"]), None)
                in_flight = (stats["in_flight"] + after["in_flight"]) / 2
                if in_flight >= 9_900:
                    loaded.append((time.monotonic(), after["utilization"]["sampler_cpu_s"]))
                    polls.append(
                        {
                            "in_flight": in_flight,
                            "top_count": top["count"] if top else 0,
                            "top_where": top["where"] if top else None,
                            "total": tasks["total"],
                            "ended": tasks.get("ended", 0),
                            "build_ms": tasks["build_ms"],
                            "loop_ms": tasks["loop_ms"],
                            "utilization_10s": after["utilization"]["last_10s"],
                        }
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(bench.wait(), poll)
    finally:
        await server.stop()
    result = json.loads((out / "result.json").read_text())
    loaded_cpu = (loaded[-1][1] - loaded[0][1]) if len(loaded) > 1 else None
    loaded_wall = (loaded[-1][0] - loaded[0][0]) if len(loaded) > 1 else None

    def med(key: str) -> float | None:
        values = [float(p[key]) for p in polls]
        return round(statistics.median(values), 3) if values else None

    return {
        "loop": loop,
        "idle": {"wall_s": round(idle_wall, 1), "sampler_cpu_s": round(idle_cpu, 4),
                 "sampler_cpu_per_s": round(idle_cpu / idle_wall, 5)},
        "at_10k": {
            "polls": len(polls),
            "sampler_cpu_per_s": round(loaded_cpu / loaded_wall, 5) if loaded_cpu else None,
            "wall_s": round(loaded_wall, 1) if loaded_wall else None,
            "build_ms_median": med("build_ms"),
            "build_ms_max": max((p["build_ms"] for p in polls), default=None),
            "loop_ms_median": med("loop_ms"),
            "loop_ms_max": max((p["loop_ms"] for p in polls), default=None),
            "worst_count_error": max(
                (abs(p["top_count"] - p["in_flight"]) / p["in_flight"] for p in polls),
                default=None,
            )
            if with_tasks
            else None,
            # the same, with the tasks that ended before the walk reached them counted back in
            "worst_count_error_with_ended": max(
                (abs(p["top_count"] + p["ended"] - p["in_flight"]) / p["in_flight"] for p in polls),
                default=None,
            )
            if with_tasks
            else None,
            "ended_max": max((p["ended"] for p in polls), default=None),
            "top_where": polls[-1]["top_where"] if polls else None,
            "utilization_10s_median": med("utilization_10s"),
        },
        "bench": {
            "failures": result["failures"],
            "lag_p99_ms": result["server"]["lag_ms"]["p99"],
            "lag_max_ms": result["server"]["lag_ms"]["max"],
            "p99_ms": result["latency_ms"]["p99"],
            "utilization": result["server"].get("utilization"),
        },
        "polls_sample": polls[:3],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--idle", type=float, default=30.0, help="idle seconds measured first")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between /tasks polls")
    parser.add_argument("--out", type=Path, default=None, help="bench output directory")
    parser.add_argument("--no-tasks", action="store_true", help="control run: no /tasks polls")
    args = parser.parse_args()
    out = args.out or ROOT / "results" / f"why-10k-{args.loop}{'-control' if args.no_tasks else ''}"
    result = asyncio.run(measure(args.loop, args.idle, args.poll, out, not args.no_tasks))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
