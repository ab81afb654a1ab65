"""result.json: one bench run's numbers, from the client's request log and the server's samples."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.bench.latency import LatencySummary, Request, RequestLog
from app.bench.sampler import LagHistogram, ServerSample, lag_over

PROBE_NAME = "/healthz (probe)"  # the name loadtest/looplab_users.py reports the probe under


def _r(value: float, digits: int = 3) -> float:
    return round(value, digits)


def lag_block(histogram: LagHistogram | None, window_max_ms: float | None) -> dict[str, Any]:
    """p50/p99 as Prometheus' histogram_quantile over the span, plus the exact bucket of the p99."""
    if histogram is None or not histogram.count:
        return {"p50": None, "p99": None, "max": window_max_ms, "mean": None, "samples": 0}
    lo, hi = histogram.bucket_of(0.99)
    top_lo, top_hi = histogram.bucket_of(1.0)
    return {
        "p50": _r(histogram.quantile_ms(0.50)),
        "p99": _r(histogram.quantile_ms(0.99)),
        "max": window_max_ms,
        "mean": _r(histogram.mean_ms()),
        "p99_bucket": [_r(1000 * lo), None if hi == float("inf") else _r(1000 * hi)],
        "max_bucket": [_r(1000 * top_lo), None if top_hi == float("inf") else _r(1000 * top_hi)],
        "samples": int(histogram.count),
    }


def load_end(last_request_end: float, locust_started: float, duration_s: float) -> float:
    """When the load ended: when locust's run time is up. Its users still finish requests while
    it stops them, and those seconds, in which the server drops every connection, are teardown."""
    return min(last_request_end, locust_started + duration_s)


@dataclass(frozen=True)
class ServerRun:
    """What the bench saw of the server: a baseline before the load, then samples during it."""

    baseline: ServerSample
    during: Sequence[ServerSample]  # taken after locust started, the last one after it stopped
    fresh: bool  # started by this bench (so its all-time peak belongs to this run)
    cpu_s: float | None  # CPU the server process used during the load, if local
    load_end: float  # epoch the load ended (`load_end()`); later samples saw only the teardown

    def under_load(self) -> list[ServerSample]:
        return [s for s in self.during if s.t <= self.load_end]

    def window_lag_ms(self, samples: Sequence[ServerSample], key: str) -> list[float]:
        """The server's rolling-window lag figures, minus any still showing the pre-load window.

        The first samples' windows reach back before the load (server startup); a figure equal
        to the baseline's is that same pre-load sample, not something the load did.
        """
        stale = float(self.baseline.stats["lag_ms"][key])
        window = float(self.baseline.stats.get("lag_window_s", 0.0))
        return [
            float(s.stats["lag_ms"][key])
            for s in samples
            if s.t - window >= self.baseline.t or float(s.stats["lag_ms"][key]) != stale
        ]

    def utilization(self, samples: Sequence[ServerSample]) -> dict[str, Any] | None:
        """The server's own `utilization.last_10s` during the load: median and max, by cause.

        Samples whose 10 s window still reaches back before the load are left out when later
        ones exist; None if the server does not report utilisation (off Linux, older servers).
        """
        with_util = [s for s in samples if s.stats.get("utilization")]
        settled = [s for s in with_util if s.t - 10.0 >= self.baseline.t] or with_util
        if not settled:
            return None
        busy = [float(s.stats["utilization"]["last_10s"]) for s in settled]
        causes = settled[0].stats["utilization"]["by_cause"]
        return {
            "median": _r(statistics.median(busy), 4),
            "max": _r(max(busy), 4),
            "by_cause": {
                cause: _r(statistics.median(float(s.stats["utilization"]["by_cause"][cause])
                                            for s in settled), 4)
                for cause in causes
            },
            "samples": len(settled),
        }  # fmt: skip

    def summary(self) -> dict[str, Any]:
        base, samples = self.baseline, list(self.during)
        last = samples[-1] if samples else base
        loaded = self.under_load()
        window_max = self.window_lag_ms(loaded, "max")
        window_p99 = self.window_lag_ms(loaded, "p99")
        teardown = [s for s in samples if s.t > self.load_end]
        if self.fresh:
            peak_open = int(last.stats["connections"]["peak"])
        else:
            peak_open = max((s.open_connections for s in samples), default=0)
        accepted = int(last.stats["connections"]["accepted_total"]) - int(
            base.stats["connections"]["accepted_total"]
        )
        rss_peak = max([base.rss_mb, *(s.rss_mb for s in samples)])
        if self.fresh:
            rss_peak = max(rss_peak, float(last.stats.get("rss_mb_peak", rss_peak)))
        requests = int(last.stats.get("requests_total", 0)) - int(
            base.stats.get("requests_total", 0)
        )
        growth_kb = (rss_peak - base.rss_mb) * 1024.0
        return {
            "loop": last.stats["loop"],
            "pid": last.stats["pid"],
            "lag_ms": lag_block(lag_over([base, *loaded]), max(window_max, default=None)),
            "lag_window_s": base.stats.get("lag_window_s"),
            # users stopping at the end drop every connection at once; that is not the load
            "teardown_lag_ms": lag_block(lag_over(loaded[-1:] + teardown), None),
            "lag_window_p99_ms": {
                "median": _r(statistics.median(window_p99)) if window_p99 else None,
                "max": max(window_p99, default=None),
            },
            "utilization": self.utilization(loaded),
            "peak_open_connections": peak_open,
            "accepted_connections": accepted,
            "rss_mb_baseline": base.rss_mb,
            "rss_mb_peak": rss_peak,
            "rss_kb_per_connection": _r(growth_kb / peak_open, 2) if peak_open else None,
            "requests": requests,
            "cpu_s": None if self.cpu_s is None else _r(self.cpu_s, 2),
            "cpu_ms_per_request": _r(1000.0 * self.cpu_s / requests, 4)
            if self.cpu_s is not None and requests
            else None,
            "samples": len(samples),
        }


def _worst(blocks: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The lag block with the highest p99 (None counts lowest), its max the highest of all."""
    worst = dict(max(blocks, key=lambda b: -1.0 if b[key]["p99"] is None else b[key]["p99"])[key])
    maxes = [b[key]["max"] for b in blocks if b[key]["max"] is not None]
    if maxes:
        worst["max"] = max(maxes)
    return worst


def combine_workers(workers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `server` block over N worker processes: counts summed, each figure's worst worker.

    `workers` is every worker's own summary (ServerRun.summary()); it is kept as `workers`.
    Peak open connections is the sum of the workers' peaks: each is reached on the plateau of
    the load, where they hold their users together.
    """
    if len(workers) == 1:
        return {**workers[0], "workers": [dict(workers[0])]}
    requests = sum(int(w["requests"]) for w in workers)
    cpu = [w["cpu_s"] for w in workers if w["cpu_s"] is not None]
    window_medians = [w["lag_window_p99_ms"]["median"] for w in workers]
    window_maxes = [w["lag_window_p99_ms"]["max"] for w in workers]
    per_conn = [w["rss_kb_per_connection"] for w in workers if w["rss_kb_per_connection"]]
    cpu_s = sum(cpu) if len(cpu) == len(workers) else None
    return {
        "loop": workers[0]["loop"],
        "pid": [w["pid"] for w in workers],
        "lag_ms": _worst(workers, "lag_ms"),
        "lag_window_s": workers[0]["lag_window_s"],
        "teardown_lag_ms": _worst(workers, "teardown_lag_ms"),
        "lag_window_p99_ms": {
            "median": max((v for v in window_medians if v is not None), default=None),
            "max": max((v for v in window_maxes if v is not None), default=None),
        },
        "peak_open_connections": sum(int(w["peak_open_connections"]) for w in workers),
        "accepted_connections": sum(int(w["accepted_connections"]) for w in workers),
        "rss_mb_baseline": _r(sum(float(w["rss_mb_baseline"]) for w in workers), 2),
        "rss_mb_peak": _r(sum(float(w["rss_mb_peak"]) for w in workers), 2),
        "rss_kb_per_connection": max(per_conn, default=None),  # the worst worker
        "requests": requests,
        "cpu_s": None if cpu_s is None else _r(cpu_s, 2),
        "cpu_ms_per_request": _r(1000.0 * cpu_s / requests, 4)
        if cpu_s is not None and requests
        else None,
        "samples": sum(int(w["samples"]) for w in workers),
        "workers": [dict(w) for w in workers],
    }


def latency_block(summary: LatencySummary) -> dict[str, float]:
    return {"p50": summary.p50, "p95": summary.p95, "p99": summary.p99, "max": summary.max}


def phase_rows(
    log: RequestLog, samples: Sequence[ServerSample], phases: Sequence[tuple[float, str]]
) -> list[dict[str, Any]]:
    """Per phase of a LoadTestShape: each request name's latency and the loop lag in that phase."""
    rows = []
    end_of_run = log.span()[1]
    for i, (start, name) in enumerate(phases):
        end = phases[i + 1][0] if i + 1 < len(phases) else end_of_run
        inside: dict[str, list[Request]] = {}
        for r in log.between(start, end):
            inside.setdefault(r.name, []).append(r)
        in_phase = [s for s in samples if start <= s.t <= end]
        rows.append(
            {
                "phase": name,
                "start": start,
                "duration_s": _r(end - start, 1),
                "by_name": {
                    n: _name_block(LatencySummary.of(rs)) for n, rs in sorted(inside.items())
                },
                "lag_ms": lag_block(lag_over(in_phase), None),
            }
        )
    return rows


def _name_block(s: LatencySummary) -> dict[str, Any]:
    return {
        "requests": s.requests,
        "failures": s.failures,
        "p50": s.p50,
        "p95": s.p95,
        "p99": s.p99,
        "max": s.max,
    }


def source_version() -> str | None:
    """The git commit the server and scenarios ran from, "+dirty" if app/ or loadtest/ differ.

    An installed copy has no git: LOOP_LAB_SOURCE, set by whoever built it, says instead.
    """
    if given := os.environ.get("LOOP_LAB_SOURCE"):
        return given
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "app", "loadtest"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if changed else "")


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    with contextlib.suppress(ValueError, OSError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def build_result(
    *,
    params: dict[str, Any],
    log: RequestLog,
    server: ServerRun | Sequence[ServerRun],
    phases: Sequence[tuple[float, str]],
    load_generator: dict[str, Any],
) -> dict[str, Any]:
    overall = LatencySummary.of(log.requests)
    start, end = log.span()
    span = end - start
    runs = [server] if isinstance(server, ServerRun) else list(server)
    server_block = combine_workers([run.summary() for run in runs])
    return {
        "scenario": params["scenario"],
        "loop": server_block.pop("loop"),
        "users": params["users"],
        "duration_s": params["duration_s"],
        "delay_s": params["delay_s"],
        "requests": overall.requests,
        "failures": overall.failures,
        "rps": _r(overall.requests / span, 2) if span > 0 else 0.0,
        "latency_ms": latency_block(overall),
        "by_name": {name: _name_block(LatencySummary.of(rs)) for name, rs in log.by_name().items()},
        "server": server_block,
        "load_generator": load_generator,
        "phases": phase_rows(log, [runs[0].baseline, *runs[0].during], phases),
        "params": params,
        "span_s": _r(span, 2),
        "machine": machine(),
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """max/min of positive values: 1.0 means identical, 1.1 means a 10% spread."""
    return max(values) / min(values) if values and min(values) > 0 else float("nan")
