"""`loop-lab serve` with CPython's cyclic garbage collector timed (or switched off).

Every collection runs on the loop thread, so its duration is loop lag. This wrapper logs one line
per collection (generation, milliseconds) to stderr and otherwise runs the normal server:

    python scripts/gc_pauses.py serve --port 0 --max-delay 60 2> server.log
    python scripts/gc_pauses.py --gc off serve --port 0 --max-delay 60   # no collections at all
    python scripts/gc_pauses.py --summary server.log                      # totals per generation

Then bench it with `loop-lab bench multiplex --users 10000 --delay 10 --target URL`.
"""

from __future__ import annotations

import gc
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


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"]:
        summary(argv[1])
        return 0
    if argv[:2] == ["--gc", "off"]:
        gc.disable()
        argv = argv[2:]
    else:
        gc.callbacks.append(_timer)
    from app.cli import main as loop_lab

    return loop_lab(argv)


if __name__ == "__main__":  # the process pool's forkserver re-imports this file: no side effects
    sys.exit(main(sys.argv[1:]))
