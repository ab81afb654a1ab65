"""Server RSS across many waves of an /offload flood, per loop: does it level off?

Each wave is `--flood` concurrent `/offload?delay=D` against a `loop-lab serve` with a small thread
pool and a bounded queue (most of the flood gets 503 at once); RSS is read from /proc after every
wave. `--malloc-arena-max N` starts the server with glibc's MALLOC_ARENA_MAX=N, to tell memory
the server's Python objects keep from memory glibc's per-thread malloc arenas keep.

    flock /tmp/looplab-bench.lock .venv/bin/python scripts/flood_memory.py --waves 30
    flock /tmp/looplab-bench.lock .venv/bin/python scripts/flood_memory.py --malloc-arena-max 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.reliability_support, when run as a script

from app.launch import ServerProcess  # noqa: E402
from app.loops import LOOP_NAMES  # noqa: E402
from app.monitor.process import raise_nofile_limit  # noqa: E402
from tests.reliability_support import http_get, rss_mb  # noqa: E402


async def waves(loop_name: str, args: argparse.Namespace) -> list[float]:
    """RSS in MB: idle, then after each wave."""
    if args.malloc_arena_max:
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    else:
        os.environ.pop("MALLOC_ARENA_MAX", None)
    server = await ServerProcess(
        "--loop",
        loop_name,
        "--thread-workers",
        str(args.workers),
        "--pool-queue",
        str(args.queue),
        "--max-delay",
        "5",
    ).start()
    statuses: Counter[int] = Counter()
    try:
        rss = [rss_mb(server.pid)]
        for _ in range(args.waves):
            answers = await asyncio.gather(
                *(http_get(server.port, f"/offload?delay={args.delay}") for _ in range(args.flood))
            )
            statuses.update(status for status, _, _ in answers)
            rss.append(rss_mb(server.pid))
    finally:
        await server.stop()
    print(f"{loop_name}: answers {dict(sorted(statuses.items()))}", flush=True)
    return rss


def describe(loop_name: str, rss: list[float], tail: int) -> str:
    late = rss[-tail:]
    per_wave = (late[-1] - late[0]) / (len(late) - 1)
    steps = [b - a for a, b in itertools.pairwise(rss[1:])]
    return (
        f"{loop_name}: idle {rss[0]:.1f} MB, after wave 1 {rss[1]:.1f}, last {rss[-1]:.1f}; "
        f"last {tail} waves {per_wave:+.2f} MB/wave; median step {statistics.median(steps):+.2f}\n"
        f"  per wave: {', '.join(f'{r:.1f}' for r in rss)}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=[*LOOP_NAMES, "both"], default="both")
    parser.add_argument("--waves", type=int, default=30)
    parser.add_argument("--flood", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--malloc-arena-max", type=int, default=0)
    args = parser.parse_args()
    raise_nofile_limit()
    loops = LOOP_NAMES if args.loop == "both" else (args.loop,)
    arenas = args.malloc_arena_max or "glibc default"
    print(
        f"{args.waves} waves of {args.flood} x /offload?delay={args.delay}, "
        f"{args.workers} threads, queue {args.queue}, MALLOC_ARENA_MAX {arenas}"
    )
    for loop_name in loops:
        rss = await waves(loop_name, args)
        print(describe(loop_name, rss, tail=min(10, args.waves)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
