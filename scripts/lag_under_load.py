"""Re-read a sweep's recorded /stats: each worker's lag windows and stalls up to the load's end.

Runs made before `app.bench.results.load_end` counted the ~20 s in which locust stops 100,000
users as load. This reads `server_stats.jsonl` and the request samples of each run below a
`compare --sweep` directory and takes the load's end as the first request plus the duration.

    python scripts/lag_under_load.py results/sweep-limits  # the sweep's --out
"""

from __future__ import annotations

import glob
import json
import sys
from typing import Any


def _level(run_dir: str) -> tuple[int, str]:
    return int(run_dir.split("users-")[1].split("/")[0]), run_dir


def main(root: str) -> None:
    for run_dir in sorted(glob.glob(f"{root}/users-*/round-1-*"), key=_level):
        with open(f"{run_dir}/result.json", encoding="utf-8") as f:
            duration_s = float(json.load(f)["duration_s"])
        starts, ends = [], []
        for path in glob.glob(f"{run_dir}/samples/*.tsv"):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    t, _name, ms, _failed = line.split("\t")
                    ends.append(float(t))
                    starts.append(float(t) - float(ms) / 1000.0)
        end = min(starts) + duration_s
        by_pid: dict[int, list[dict[str, Any]]] = {}
        with open(f"{run_dir}/server_stats.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                by_pid.setdefault(row["pid"], []).append(row)
        p99s, maxes, stalls = [], [], []
        for rows in by_pid.values():
            first = rows[0]["t"]
            # a 10 s window that reaches back before the first sample is start-up, not load
            loaded = [r for r in rows if first + 10.0 <= r["t"] <= end]
            p99s.append(max(r["lag_ms"]["p99"] for r in loaded))
            maxes.append(max(r["lag_ms"]["max"] for r in loaded))
            seen = {(s["started_s"], s["duration_ms"]) for r in rows for s in r["stalls_recent"]}
            uptime_at_end = rows[-1]["uptime_s"] - (rows[-1]["t"] - end)
            stalls.append(sum(1 for started, _ in seen if started < uptime_at_end))
        print(
            f"{run_dir.split('/')[-2]} {run_dir.split('/')[-1][len('round-1-') :]}: "
            f"requests finished {max(ends) - end:.1f} s after the load; per worker, the worst "
            f"10 s window's lag p99 {min(p99s):g}-{max(p99s):g} ms, max {min(maxes):g}-"
            f"{max(maxes):g} ms; stalls under load {stalls}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
