"""`loop-lab compare`: the same scenario on asyncio and on uvloop, in alternating rounds.

Round n runs both loops back to back, asyncio first in odd rounds and uvloop first in even ones, so
a drift of the machine (other work, thermal, page cache) hits both loops alike; the uvloop/asyncio
ratio is taken within each round (paired), and the spread of those ratios says how far to trust it.
`--sweep` repeats that at several concurrency levels to draw the scaling curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.bench.bench import BenchConfig, BenchOutcome, run_bench, summary_line
from app.bench.plots import compare_plot, sweep_plot
from app.bench.preflight import fewest_workers
from app.bench.report import compare_report
from app.bench.results import machine, median, source_version, spread, write_json
from app.loops import LOOP_NAMES, LoopName

SPREAD_LIMIT = 1.10  # paired ratios that disagree by more than 10% are flagged


@dataclass(frozen=True)
class CompareConfig:
    base: BenchConfig  # scenario, users, duration, delay, ... (loop and out are set per run)
    rounds: int = 3
    urls: dict[LoopName, str] | None = None  # running servers instead of local ones
    sweep: tuple[int, ...] = ()

    def levels(self) -> list[int]:
        return list(self.sweep) or [self.base.users]

    def level_config(self, users: int) -> BenchConfig:
        """The base config at `users`: on the fewest server workers (at least --workers) that
        the fd limit allows when the servers are local."""
        workers = self.base.workers
        if self.urls is None:
            workers = max(workers, fewest_workers(users))
        return replace(self.base, users=users, workers=workers)

    def preflight(self) -> None:
        """Every level's preflight, before the first one starts (PreflightError names the limit)."""
        for users in self.levels():
            for loop in LOOP_NAMES:
                target = None if self.urls is None else self.urls[loop]
                replace(self.level_config(users), target=target).plan()


def run_order(round_number: int) -> tuple[LoopName, LoopName]:
    """asyncio first in odd rounds, uvloop first in even rounds."""
    return ("asyncio", "uvloop") if round_number % 2 else ("uvloop", "asyncio")


Getter = Callable[[dict[str, Any]], float | None]
SUMMARY_KEYS: dict[str, Getter] = {
    "rps": lambda r: r["rps"],
    "p50_ms": lambda r: r["latency_ms"]["p50"],
    "p99_ms": lambda r: r["latency_ms"]["p99"],
    "lag_p99_ms": lambda r: r["server"]["lag_ms"]["p99"],
    "cpu_ms_per_request": lambda r: r["server"]["cpu_ms_per_request"],
    "rss_kb_per_connection": lambda r: r["server"]["rss_kb_per_connection"],
    # the server's own busy share (last 10 s, sampled during the run): its headroom at this load
    "utilization": lambda r: (r["server"].get("utilization") or {}).get("median"),
}
RATIO_KEYS: dict[str, Getter] = {
    "rps": SUMMARY_KEYS["rps"],
    "p99": SUMMARY_KEYS["p99_ms"],
    "cpu_per_request": SUMMARY_KEYS["cpu_ms_per_request"],
}


def _values(runs: Sequence[dict[str, Any]], loop: str, get: Getter) -> list[float]:
    values = [get(run["result"]) for run in runs if run["loop"] == loop]
    return [float(v) for v in values if v is not None]


def summarize(runs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Medians per loop, and uvloop/asyncio ratios paired by round (median, min, max, spread)."""
    summary: dict[str, Any] = {}
    for loop in LOOP_NAMES:
        block: dict[str, Any] = {}
        for key, get in SUMMARY_KEYS.items():
            values = _values(runs, loop, get)
            block[key] = round(median(values), 3) if values else None
        rps = _values(runs, loop, SUMMARY_KEYS["rps"])
        block["rps_min"], block["rps_max"] = (min(rps), max(rps)) if rps else (None, None)
        summary[loop] = block
    ratio: dict[str, Any] = {}
    rounds = sorted({int(run["round"]) for run in runs})
    for key, get in RATIO_KEYS.items():
        paired = []
        for n in rounds:
            pair = {run["loop"]: get(run["result"]) for run in runs if run["round"] == n}
            a, u = pair.get("asyncio"), pair.get("uvloop")
            if a and u is not None:
                paired.append(float(u) / float(a))
        if paired:
            ratio[key] = {
                "median": round(median(paired), 4),
                "min": round(min(paired), 4),
                "max": round(max(paired), 4),
                "spread": round(spread(paired), 4),
                "per_round": [round(p, 4) for p in paired],
            }
    return summary, ratio


def notes_for(level: dict[str, Any], base: BenchConfig) -> list[str]:
    notes = []
    for key, r in level["ratio"].items():
        if key in ("rps", "p99") and not math.isnan(r["spread"]) and r["spread"] > SPREAD_LIMIT:
            notes.append(
                f"the paired {key} ratios spread by {100 * (r['spread'] - 1):.1f}% "
                f"(> {100 * (SPREAD_LIMIT - 1):.0f}%): rounds disagree, see the rounds table"
            )
    if base.scenario == "multiplex" and base.delay_s > 0:
        paced = level["users"] / base.delay_s
        notes.append(
            f"multiplex users wait {base.delay_s:g} s per request, so the rate is capped near "
            f"users/delay = {paced:,.0f} rps on either loop: compare p99, loop lag and server "
            "CPU per request, not rps"
        )
    return notes


async def _level(
    config: CompareConfig, users: int, out: Path, log: Callable[[str], None]
) -> tuple[dict[str, Any], list[BenchOutcome]]:
    runs: list[dict[str, Any]] = []
    outcomes = []
    for n in range(1, config.rounds + 1):
        for loop in run_order(n):
            run_config = replace(
                config.level_config(users),
                loop=loop,
                out=out / f"round-{n}-{loop}",
                target=None if config.urls is None else config.urls[loop],
            )
            log(
                f"round {n}/{config.rounds}: {loop}, {users:,} users"
                + (f", {run_config.workers} workers" if run_config.workers > 1 else "")
            )
            outcome = await run_bench(run_config)
            log("  " + summary_line(outcome.result))
            outcomes.append(outcome)
            runs.append({"loop": loop, "round": n, "users": users, "result": outcome.result})
    summary, ratio = summarize(runs)
    level = {"users": users, "rounds": runs, "summary": summary, "ratio": ratio}
    level["notes"] = notes_for(level, config.base)
    return level, outcomes


@dataclass(frozen=True)
class CompareOutcome:
    data: dict[str, Any]
    exit_code: int


async def run_compare(
    config: CompareConfig, command: Sequence[str], log: Callable[[str], None]
) -> CompareOutcome:
    out = config.base.out
    out.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    config.preflight()
    levels = config.levels()
    blocks, outcomes = [], []
    for users in levels:
        level_out = out / f"users-{users}" if config.sweep else out
        block, level_outcomes = await _level(config, users, level_out, log)
        blocks.append(block)
        outcomes += level_outcomes
    headline = blocks[-1]  # with --sweep, the largest concurrency is the headline comparison
    data: dict[str, Any] = {
        "scenario": config.base.scenario,
        "users": headline["users"],
        "duration_s": config.base.duration_s,
        "delay_s": config.base.delay_s,
        "rounds": headline["rounds"],
        "summary": headline["summary"],
        "ratio": headline["ratio"],
        "notes": headline["notes"],
        "started_at": started_at,
        "source": source_version(),
        "command": list(command),
        "machine": machine(),
    }
    if config.sweep:
        data["sweep"] = [
            {"users": b["users"], **{k: run[k] for k in ("loop", "round", "result")}}
            for b in blocks
            for run in b["rounds"]
        ]
        data["sweep_levels"] = [
            {k: b[k] for k in ("users", "summary", "ratio", "notes")} for b in blocks
        ]
        sweep_plot(
            [_median_point(b, loop) for b in blocks for loop in LOOP_NAMES],
            f"{config.base.scenario}: scaling with concurrency (delay {config.base.delay_s:g} s)",
            out / "sweep.png",
            config.base.delay_s if config.base.scenario == "multiplex" else 0.0,
        )
    write_json(out / "compare.json", data)
    compare_plot(
        data["rounds"],
        f"{config.base.scenario}, {data['users']:,} users: asyncio vs uvloop by round",
        out / "compare.png",
    )
    (out / "compare.md").write_text(compare_report(data, command), encoding="utf-8")
    failed = [o for o in outcomes if o.exit_code]
    return CompareOutcome(data, max((o.exit_code for o in failed), default=0))


def _median_point(block: dict[str, Any], loop: LoopName) -> dict[str, Any]:
    """One sweep point per (users, loop): the run whose p99 is the median of its rounds."""
    mine = sorted(
        (run for run in block["rounds"] if run["loop"] == loop),
        key=lambda run: run["result"]["latency_ms"]["p99"],
    )
    chosen = mine[(len(mine) - 1) // 2]
    return {"users": block["users"], "loop": loop, "result": chosen["result"]}
