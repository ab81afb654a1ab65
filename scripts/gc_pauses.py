"""`loop-lab serve` with every collection of CPython's cyclic garbage collector logged.

Every collection runs on the loop thread, so its duration is loop lag. The server itself counts
and times them (`/stats` `gc`, `looplab_gc_pause_seconds`); this wrapper also logs one line per
collection (time, generation, milliseconds) to stderr, so a run can be read as a timeline.
`--gc` is the server's own setting (app/gctune.py):

    python scripts/gc_pauses.py serve --port 0 --max-delay 60 --gc default 2> server.log
    python scripts/gc_pauses.py serve --port 0 --max-delay 60 --gc tuned 2> server.log
    python scripts/gc_pauses.py --summary server.log   # count, total, median, max per generation
    python scripts/gc_pauses.py --timeline results/bench-.../server_stats.jsonl

`--timeline` needs no wrapper: it prints, per second of a `loop-lab bench` run, the open
connections, the collections of each generation in that second and the longest pause so far,
from the `/stats` samples bench saved (the server's own `gc` section).

Then bench it with `loop-lab bench multiplex --users 10000 --delay 10 --target URL`.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time
from collections import defaultdict
from typing import Any

LINE = re.compile(r"GCPAUSE (?P<t>[\d.]+) gen(?P<gen>\d) (?P<ms>[\d.]+) ms")
_started = 0.0


def _timer(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    ms = (time.perf_counter() - _started) * 1000.0
    print(f"GCPAUSE {time.time():.3f} gen{info['generation']} {ms:.1f} ms", file=sys.stderr)


def summary(path: str) -> None:
    pauses: dict[int, list[float]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = LINE.search(line)
            if match:
                pauses[int(match["gen"])].append(float(match["ms"]))
    for gen, ms in sorted(pauses.items()):
        ms.sort()
        print(
            f"gen{gen}: {len(ms)} collections, total {sum(ms):.0f} ms, "
            f"median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms"
        )


def timeline(path: str) -> None:
    previous: list[int] | None = None
    started = 0.0
    print("   s   open  gen0  gen1  gen2  longest so far ms (gen0/gen1/gen2)  lag max, last 10 s")
    with open(path, encoding="utf-8") as f:
        for line in f:
            sample = json.loads(line)
            gens = sample.get("gc", {}).get("generations")
            if not gens:
                continue  # a server without the gc section
            counts = [g["collections"] for g in gens]
            if previous is None:
                previous, started = counts, sample["t"]
            new = [now - before for now, before in zip(counts, previous, strict=True)]
            previous = counts
            longest = "/".join(f"{g['pause_ms_max']:.1f}" for g in gens)
            lag_max = sample["lag_ms"]["max"]
            print(
                f"{sample['t'] - started:5.1f} {sample['connections']['open']:6d} "
                f"{new[0]:5d} {new[1]:5d} {new[2]:5d}  {longest:>34s}  {lag_max:8.1f}"
            )


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"]:
        summary(argv[1])
        return 0
    if argv[:1] == ["--timeline"]:
        timeline(argv[1])
        return 0
    gc.callbacks.append(_timer)
    from app.cli import main as loop_lab

    return loop_lab(argv)


if __name__ == "__main__":  # the process pool's forkserver re-imports this file: no side effects
    sys.exit(main(sys.argv[1:]))
