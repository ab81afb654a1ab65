"""Re-read a sweep's recorded /stats: each worker's lag windows and stalls up to the load's end.

Runs made before `app.bench.results.load_end` counted the ~20 s in which locust stops 100,000
users as load. This reads `server_stats.jsonl` and the request samples of each run below a
`compare --sweep` directory and ends the load as the bench now does, with locust's start taken
as the first request's (the start itself was not recorded).

    python scripts/lag_under_load.py results/sweep-limits  # the sweep's --out
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.bench.latency import RequestLog
from app.bench.results import ServerRun, load_end
from app.bench.sampler import ServerSample


def _level(run_dir: Path) -> tuple[int, str]:
    return int(run_dir.parent.name.removeprefix("users-")), run_dir.name


def main(root: Path) -> None:
    for run_dir in sorted(root.glob("users-*/round-1-*"), key=_level):
        duration_s = float(json.loads((run_dir / "result.json").read_text())["duration_s"])
        first, last = RequestLog.read(run_dir / "samples").span()
        end = load_end(last, first, duration_s)
        by_pid: dict[int, list[ServerSample]] = {}
        for line in (run_dir / "server_stats.jsonl").read_text().splitlines():
            stats = json.loads(line)
            by_pid.setdefault(stats["pid"], []).append(ServerSample(stats.pop("t"), stats, None))
        p99s, maxes, stalls = [], [], []
        for samples in by_pid.values():
            # the first sample stands in for the baseline the file does not keep
            run = ServerRun(samples[0], samples[1:], fresh=True, cpu_s=None, load_end=end)
            p99s.append(max(run.window_lag_ms(run.under_load(), "p99")))
            maxes.append(max(run.window_lag_ms(run.under_load(), "max")))
            final = samples[-1]
            uptime_at_end = final.stats["uptime_s"] - (final.t - end)
            started = {s["started_s"] for x in samples for s in x.stats["stalls_recent"]}
            stalls.append(sum(1 for s in started if s < uptime_at_end))
        print(
            f"{run_dir.parent.name} {run_dir.name.removeprefix('round-1-')}: "
            f"requests finished {last - end:.1f} s after the load; per worker, the worst "
            f"10 s window's lag p99 {min(p99s):g}-{max(p99s):g} ms, max {min(maxes):g}-"
            f"{max(maxes):g} ms; stalls under load {stalls}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
