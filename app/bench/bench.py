"""One bench run: server (unless --target), locust headless, /stats sampling, then the outputs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.bench import scenarios
from app.bench.latency import RequestLog, read_phases
from app.bench.plots import RunPlots
from app.bench.preflight import Machine, Plan, plan_run
from app.bench.progress import BenchProgress
from app.bench.report import bench_report
from app.bench.results import (
    PROBE_NAME,
    ServerRun,
    build_result,
    load_end,
    source_version,
    write_json,
)
from app.bench.runner import LocustCommand, auto_processes, lab_server, run_locust
from app.bench.sampler import ServerSample, WorkerSamplers
from app.launch import ServerProcess
from app.loops import LoopName
from app.monitor.process import cpu_seconds, raise_nofile_limit
from app.server import is_loopback

SAMPLES_ENV = "LOOP_LAB_SAMPLES_DIR"  # read by loadtest/looplab_users.py
SOURCES_ENV = "LOOP_LAB_LOCUST_SOURCES"  # the same: loopback addresses users connect from
SPAWN_PER_PROCESS = 250  # users/s; measured: 950/s per worker lost heartbeats at 19,000 users
LOCUST_GRACE_S = 180.0  # startup, stopping 10k users, writing reports


def _is_loopback_url(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname or "")


class BenchError(RuntimeError):
    """The run could not be carried out (server or locust failed); the message says where."""


@dataclass(frozen=True)
class BenchConfig:
    scenario: str
    out: Path
    loop: LoopName = "asyncio"
    users: int = 1000
    spawn_rate: float | None = None  # None: ramp up over min(10 s, a quarter of the run)
    duration_s: int = 60
    delay_s: float = 1.0
    block_s: float = 0.2
    blockers: int = 2
    target: str | None = None
    max_failures: int | None = None
    processes: int | None = None  # locust processes; None: by user count and fd limit
    workers: int = 1  # server processes sharing one port (SO_REUSEPORT)
    sources: int = 0  # loopback source addresses users connect from; 0: as the ports need
    progress: bool = True
    command: tuple[str, ...] = ()
    sample_interval_s: float = 1.0

    def ramp_rate(self, processes: int = 1) -> float:
        """Users started per second: over min(10 s, a quarter of the run), but no more than
        SPAWN_PER_PROCESS per locust process (faster, a worker spends whole seconds creating
        users and misses its heartbeats to the master, which then stops and restarts the test)."""
        if self.spawn_rate is not None:
            return self.spawn_rate
        wanted = math.ceil(self.users / min(10.0, max(1.0, self.duration_s / 4)))
        return max(1.0, min(wanted, SPAWN_PER_PROCESS * processes))

    def plan(self) -> Plan:
        """The preflight: raises PreflightError if the machine cannot hold this run."""
        return plan_run(
            self.users,
            workers=self.workers,
            processes=self.processes,
            auto_processes=auto_processes(self.users),
            local_target=self.target is None or _is_loopback_url(self.target),
            sources=self.sources,
            rate=self.users / self.delay_s if self.scenario != "cpu" and self.delay_s else None,
        )

    def scenario_args(self) -> list[str]:
        return [
            "--delay",
            f"{self.delay_s:g}",
            "--block",
            f"{self.block_s:g}",
            "--blockers",
            str(self.blockers),
        ]


@dataclass(frozen=True)
class BenchOutcome:
    result: dict[str, Any]
    out: Path
    exit_code: int
    message: str


def _prepare_out(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    # the sample log appends: a reused directory must not mix in an earlier run
    for stale in [*samples.glob("samples-*.tsv"), samples / "phases.tsv"]:
        stale.unlink(missing_ok=True)
    return samples


async def run_bench(config: BenchConfig) -> BenchOutcome:
    plan = config.plan()  # before anything starts: refuses what the machine cannot hold
    locustfile = scenarios.locustfile(config.scenario)
    samples_dir = _prepare_out(config.out)
    raise_nofile_limit()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    before = Machine.read()
    server: ServerProcess | None = None
    title = f"{config.scenario} · {config.users:,} users"
    workers = config.workers
    with BenchProgress(title, config.duration_s, enabled=config.progress) as progress:
        try:
            if config.target is None:
                server = lab_server(
                    config.loop,
                    config.out / "server.log",
                    max_delay=max(60.0, 2 * config.delay_s, 2 * config.block_s),
                    workers=workers,
                    max_connections=plan.max_connections,
                )
                progress.status(f"starting a {config.loop} server ({workers} process(es))")
                url = (await server.start()).url
            else:
                url = config.target.rstrip("/")
            async with WorkerSamplers(url, workers, config.sample_interval_s) as samplers:
                await samplers.discover()
                baselines = await samplers.sample()
                for sampler in samplers.samplers:
                    sampler.samples.clear()
                samplers.samplers[0].on_sample = progress.on_sample
                pids = [b.stats["pid"] for b in baselines]
                cpu_before = [cpu_seconds(pid) for pid in pids] if server else None
                processes = plan.locust_processes
                command = LocustCommand(
                    locustfile=locustfile,
                    target=url,
                    users=config.users,
                    spawn_rate=config.ramp_rate(processes),
                    duration_s=config.duration_s,
                    out_dir=config.out,
                    processes=processes,
                    scenario_args=config.scenario_args(),
                )
                env = {**os.environ, SAMPLES_ENV: str(samples_dir), "PYTHONUNBUFFERED": "1"}
                if plan.sources:
                    env[SOURCES_ENV] = ",".join(plan.sources)
                progress.status(f"locust: {processes} process(es), ramping up")
                progress.load_started()
                samplers.start()
                locust_started = time.time()
                locust = await run_locust(
                    command,
                    env,
                    config.out / "locust.log",
                    limit_s=config.duration_s + LOCUST_GRACE_S,
                )
                await samplers.stop()
                await samplers.sample()  # the final counters, after the last request
                cpu_after = [cpu_seconds(pid) for pid in pids] if server else None
                during = [list(s.samples) for s in samplers.samplers]
                sampler_errors = samplers.errors
        finally:
            if server is not None:
                await server.stop()
        progress.status("writing results")
    after = Machine.read()
    log = RequestLog.read(samples_dir)
    if not len(log):
        raise BenchError(f"locust recorded no requests; see {config.out / 'locust.log'}")
    phases = read_phases(samples_dir)
    cpu_s: list[float | None] = [None] * len(pids)
    if cpu_before is not None and cpu_after is not None:
        cpu_s = [
            None if b is None or a is None else a - b
            for b, a in zip(cpu_before, cpu_after, strict=True)
        ]
    params: dict[str, Any] = {
        "scenario": config.scenario,
        "users": config.users,
        "workers": workers,
        "duration_s": config.duration_s,
        "delay_s": config.delay_s,
        "block_s": config.block_s,
        "blockers": config.blockers,
        "spawn_rate": config.ramp_rate(processes),
        "requested_loop": config.loop if config.target is None else None,
        "target": config.target,
        "started_at": started_at,
        "source": source_version(),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        # the machine's counters around the run (other engineers' traffic included)
        "time_wait_before": before.time_wait,
        "time_wait_after": after.time_wait,
        "listen_drops": after.listen_drops - before.listen_drops,
        "preflight": plan.as_dict(),
        "command": list(config.command),
        "locust_command": command.argv(0 if processes > 1 else None),
    }
    ended = load_end(log.span()[1], locust_started, config.duration_s)
    runs = [
        ServerRun(base, seen, fresh=server is not None, cpu_s=cpu, load_end=ended)
        for base, seen, cpu in zip(baselines, during, cpu_s, strict=True)
    ]
    locust_users = config.users
    result = build_result(
        params=params,
        log=log,
        server=runs,
        phases=phases,
        load_generator={
            "cpu_warning": locust.cpu_warning,
            "cpu_warning_lines": list(locust.cpu_warning_lines),
            "processes": processes,
            "cpu_s": round(locust.cpu_s, 2),
            # average over the run; a worker pinned near 100% is the bottleneck even unwarned
            "cpu_percent_per_process": round(100 * locust.cpu_s / locust.wall_s / processes, 1),
            "rss_mb_peak": round(locust.rss_mb_peak, 1),
            "rss_kb_per_user": round(1024 * locust.rss_mb_peak / locust_users, 2),
            "sources": list(plan.sources),
            "exit_code": locust.exit_code,
            "sampler_errors": sampler_errors,
        },
    )
    worst = max(
        range(len(runs)),
        key=lambda i: result["server"]["workers"][i]["lag_ms"]["p99"] or -1.0,
    )
    write_outputs(config, result, log, [baselines[worst], *during[worst]], phases, during)
    exit_code, message = 0, "ok"
    if config.max_failures is not None and result["failures"] > config.max_failures:
        exit_code = 1
        message = f"{result['failures']:,} failures > --max-failures {config.max_failures:,}"
    elif locust.exit_code not in (0, 1):
        exit_code = 3
        message = f"locust exited with {locust.exit_code}; see {config.out / 'locust.log'}"
    return BenchOutcome(result, config.out, exit_code, message)


def write_outputs(
    config: BenchConfig,
    result: dict[str, Any],
    log: RequestLog,
    samples: list[ServerSample],
    phases: list[tuple[float, str]],
    every_worker: Sequence[Sequence[ServerSample]] = (),
) -> None:
    """result.json, report.md, the raw /stats samples (every worker's) and the plots.

    `samples` (one worker's: the one with the worst loop lag) is what the plots show.
    """
    write_json(config.out / "result.json", result)
    with open(config.out / "server_stats.jsonl", "w", encoding="utf-8") as f:
        for s in sorted((s for w in every_worker or [samples] for s in w), key=lambda s: s.t):
            f.write(json.dumps({"t": s.t, **s.stats}) + "\n")
    (config.out / "report.md").write_text(bench_report(result), encoding="utf-8")
    title = f"{config.scenario} on {result['loop']}, {config.users:,} users"
    with contextlib.suppress(ValueError):  # an empty series must not lose the numbers above
        RunPlots(log, samples[1:], phases, title).write(config.out)


def summary_line(result: dict[str, Any]) -> str:
    server = result["server"]
    lag = server["lag_ms"]
    line = (
        f"{result['scenario']} on {result['loop']}: {result['requests']:,} requests, "
        f"{result['failures']:,} failures, {result['rps']:,.1f} rps, "
        f"p50 {result['latency_ms']['p50']:,.1f} ms, p99 {result['latency_ms']['p99']:,.1f} ms; "
        f"peak {server['peak_open_connections']:,} open connections, "
        f"{server['accepted_connections']:,} accepted; loop lag p99 "
        f"{'-' if lag['p99'] is None else format(lag['p99'], ',.1f')} ms"
    )
    workers = server.get("workers", [])
    if len(workers) > 1:
        line += f" (the worst of {len(workers)} workers)"
    if server.get("rss_kb_per_connection") is not None:
        line += f"; {server['rss_kb_per_connection']:,.2f} KB RSS per connection"
    probe = result["by_name"].get(PROBE_NAME)
    if probe:
        line += f"; probe p99 {probe['p99']:,.1f} ms"
    if result["load_generator"]["cpu_warning"]:
        line += " [locust CPU warning: load generator was a bottleneck]"
    return line
