"""`loop-lab bench`: real server and locust subprocesses, result.json, report, plots, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.bench.report import bench_report, load_generator_note
from app.bench.results import load_end
from app.bench.runner import auto_processes, cpu_warnings
from app.bench.sampler import parse_lag_histogram
from app.cli import main
from app.launch import running_server
from app.percentiles import percentile

PROBE = "/healthz (probe)"

# lines as locust 2.x writes them (runners.py), from the master, a worker and at the end
LOCUST_CPU_LINES = (
    "[2026-01-01 00:00:10,000] vm/WARNING/root: CPU usage above 90%! This may constrain your "
    "throughput and may even give inconsistent response time measurements!",
    "[2026-01-01 00:00:11,000] vm/INFO/locust.runners: Worker vm_1 (index 0) exceeded cpu "
    "threshold (will only log this once per worker)",
    "[2026-01-01 00:01:00,000] vm/WARNING/locust.runners: CPU usage threshold was exceeded on "
    "workers during the test!",
)


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "bench", *args, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
    )


def bench_result(out: Path, *args: str) -> dict[str, Any]:
    proc = run_bench(out, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


@pytest.mark.slow
def test_multiplex_run_writes_the_contract_result_and_reports(tmp_path: Path) -> None:
    """A small multiplex run fills every result.json key and writes report, plots, locust files."""
    users = 60
    result = bench_result(
        tmp_path, "multiplex", "--users", str(users), "--duration", "4", "--delay", "0.2"
    )
    for key in (
        "scenario",
        "loop",
        "users",
        "duration_s",
        "delay_s",
        "requests",
        "failures",
        "rps",
    ):
        assert key in result
    assert (result["scenario"], result["loop"], result["users"]) == ("multiplex", "asyncio", users)
    assert set(result["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert set(result["by_name"]) == {"/await", PROBE}
    for entry in result["by_name"].values():
        assert set(entry) >= {"requests", "failures", "p50", "p99"}
    server = result["server"]
    assert set(server["lag_ms"]) >= {"p50", "p99", "max"}
    assert server["peak_open_connections"] >= users
    assert users <= server["accepted_connections"] <= users + 2  # one keep-alive per user
    assert server["rss_mb_peak"] > 0
    assert set(result["load_generator"]) >= {"cpu_warning", "processes"}
    assert result["failures"] == 0
    assert result["requests"] == sum(e["requests"] for e in result["by_name"].values())
    assert 200 <= result["latency_ms"]["p50"] < 1000  # each /await waits 0.2 s on the server
    for name in ("report.md", "locust.html", "locust_stats.csv", "locust.json", "server.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    for plot in ("overview", "latency", "lag", "connections", "rps"):
        assert (tmp_path / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "# loop-lab bench: multiplex on asyncio" in report
    assert "`/await`" in report


@pytest.mark.slow
def test_blocking_starves_the_probe_and_offloading_does_not(tmp_path: Path) -> None:
    """At equal load the probe waits out whole blocks under starvation, and not under offload."""
    load = ("--users", "100", "--duration", "8", "--delay", "0.5", "--block", "0.3")
    starved = bench_result(tmp_path / "starvation", "starvation", *load)
    offloaded = bench_result(tmp_path / "offload", "offload", *load)
    starved_probe = starved["by_name"][PROBE]["p99"]
    offloaded_probe = offloaded["by_name"][PROBE]["p99"]
    assert starved["by_name"]["/block"]["requests"] > 0
    assert offloaded["by_name"]["/offload"]["requests"] > 0
    assert starved_probe >= 0.9 * 300  # waited out (most of) a 0.3 s block
    assert starved_probe >= 4 * offloaded_probe
    assert starved["server"]["lag_ms"]["max"] >= 0.9 * 300
    assert starved["server"]["lag_ms"]["p99_bucket"][0] >= 100  # exact: p99 lag above 100 ms
    assert offloaded["server"]["lag_ms"]["p99"] < 100


@pytest.mark.slow
def test_realworld_starves_the_probe_only_in_the_blocking_phases(tmp_path: Path) -> None:
    """realworld walks its eight phases; the probe waits out a blocking form, not its async one."""
    result = bench_result(
        tmp_path, "realworld", "--users", "40", "--duration", "24", "--delay", "0.3"
    )
    phases = {row["phase"]: row["by_name"] for row in result["phases"]}
    assert list(phases) == [
        "calm",
        "db sync",
        "db offload",
        "db async",
        "upstream requests",
        "upstream aiohttp",
        "json inline",
        "json process",
    ]
    assert result["failures"] == 0
    for blocking, free in (("db sync", "db async"), ("upstream requests", "upstream aiohttp")):
        assert f"/{blocking}" in phases[blocking]
        assert phases[blocking][PROBE]["p99"] >= 0.9 * 200  # waited out (most of) a 0.2 s call
        assert phases[blocking][PROBE]["p99"] > 4 * phases[free][PROBE]["p99"]


@pytest.mark.slow
def test_story_walks_its_phases_and_starves_only_in_the_starvation_phase(tmp_path: Path) -> None:
    """The story walks calm, starvation, recovery, offload, calm; blockers block only in theirs."""
    result = bench_result(
        tmp_path, "story", "--users", "60", "--duration", "15", "--delay", "0.3", "--block", "0.2"
    )
    phases = {row["phase"]: row for row in result["phases"]}
    assert [row["phase"] for row in result["phases"]] == [
        "calm",
        "starvation",
        "recovery",
        "offload",
        "calm again",
    ]
    assert "/block" in phases["starvation"]["by_name"]
    assert "/block" not in phases["calm"]["by_name"]
    assert "/offload" in phases["offload"]["by_name"]
    starved_probe = phases["starvation"]["by_name"][PROBE]["p99"]
    assert starved_probe >= 0.9 * 200  # the probe waited out (most of) a 0.2 s block
    assert starved_probe > phases["calm"]["by_name"][PROBE]["p99"]
    assert phases["starvation"]["lag_ms"]["max_bucket"][0] >= 100  # exact: a lag above 100 ms
    assert "## Phases" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_max_failures_exceeded_exits_nonzero_against_a_target(tmp_path: Path) -> None:
    """--target benches a running server; failures above --max-failures make the exit code 1."""
    with running_server("uvloop", max_delay=0.01) as server:  # /await?delay=0.05 is then a 400
        proc = run_bench(
            tmp_path,
            "multiplex",
            "--target",
            server.url,
            "--users",
            "10",
            "--duration",
            "3",
            "--delay",
            "0.05",
            "--max-failures",
            "0",
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--max-failures 0" in proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["loop"] == "uvloop"  # read from the target's /stats, not assumed
    assert result["by_name"]["/await"]["failures"] == result["by_name"]["/await"]["requests"] > 0
    assert result["by_name"][PROBE]["failures"] == 0
    assert not (tmp_path / "server.log").exists()  # nothing was started


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "nosuch"],
        ["bench", "multiplex", "--users", "0"],
        ["bench", "multiplex", "--duration", "nan"],
        ["bench", "multiplex", "--loop", "trio"],
        ["bench", "multiplex", "--target", "localhost:8080"],
        ["compare", "--sweep", "100,x"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad bench/compare arguments are rejected by the parser before anything starts."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cpu_warning_lines_are_detected() -> None:
    """Each way locust says it ran out of CPU marks the load generator as the bottleneck."""
    log = "\n".join(["[...] INFO/locust.main: Starting Locust", *LOCUST_CPU_LINES, "done"])
    assert len(cpu_warnings(log)) == 3
    assert cpu_warnings("[...] INFO/locust.main: Shutting down (exit code 0)") == ()


def test_report_says_when_the_load_generator_was_the_bottleneck() -> None:
    """report.md tells the reader plainly when locust, not the server, set the pace."""
    noted = load_generator_note({"cpu_warning": True, "cpu_warning_lines": [LOCUST_CPU_LINES[0]]})
    assert "load generator was a bottleneck" in noted
    assert "CPU usage above 90%" in noted
    assert "never reported a CPU warning" in load_generator_note(
        {"cpu_warning": False, "processes": 2}
    )


def test_report_renders_a_minimal_result() -> None:
    """The report renders from result.json alone, including absent lag and CPU figures."""
    lat = {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}
    result = {
        "scenario": "multiplex",
        "loop": "uvloop",
        "users": 1,
        "duration_s": 1,
        "delay_s": 0.0,
        "requests": 1,
        "failures": 0,
        "rps": 1.0,
        "latency_ms": lat,
        "by_name": {"/await": {"requests": 1, "failures": 0, **lat}},
        "server": {
            "lag_ms": {"p50": None, "p99": None, "max": None},
            "lag_window_s": 10.0,
            "lag_window_p99_ms": {"median": None, "max": None},
            "peak_open_connections": 1,
            "accepted_connections": 1,
            "rss_mb_baseline": 10.0,
            "rss_mb_peak": 10.0,
            "rss_kb_per_connection": 0.0,
            "requests": 1,
            "cpu_s": None,
            "cpu_ms_per_request": None,
        },
        "load_generator": {"cpu_warning": False, "processes": 1},
        "phases": [],
        "params": {"command": ["loop-lab", "bench", "multiplex"], "started_at": "today"},
        "machine": {"cpus": 2},
    }
    report = bench_report(result)
    assert "multiplex on uvloop" in report
    assert "no loop-lag samples" in report


def test_lag_histogram_quantiles_follow_prometheus_and_name_their_bucket() -> None:
    """Lag p99 is histogram_quantile over the scraped buckets, with the exact bucket it lies in."""
    text = "\n".join(
        [
            "# TYPE looplab_loop_lag_seconds histogram",
            'looplab_loop_lag_seconds_bucket{le="0.001"} 90.0',
            'looplab_loop_lag_seconds_bucket{le="0.01"} 98.0',
            'looplab_loop_lag_seconds_bucket{le="0.1"} 100.0',
            'looplab_loop_lag_seconds_bucket{le="+Inf"} 100.0',
            "looplab_loop_lag_seconds_count 100.0",
            "looplab_loop_lag_seconds_sum 0.5",
            "",
        ]
    )
    hist = parse_lag_histogram(text)
    assert hist is not None
    assert hist.bucket_of(0.99) == (0.01, 0.1)
    assert hist.quantile_ms(0.99) == pytest.approx(10 + 90 * 0.5)  # halfway into (10, 100] ms
    assert hist.quantile_ms(0.5) == pytest.approx(1000 * 0.001 * 50 / 90)
    assert hist.mean_ms() == pytest.approx(5.0)
    assert hist.minus(hist).count == 0


def test_percentile_is_nearest_rank() -> None:
    """Percentiles of the exact request log use the nearest-rank definition."""
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([], 0.99) == 0.0


def test_locust_processes_scale_with_users() -> None:
    """Small runs use one locust process; 10,000 users get at least two."""
    assert auto_processes(300) == 1
    assert auto_processes(10_000) >= 2


@pytest.mark.slow
def test_workers_each_report_their_own_stats_and_the_server_block_sums_them(
    tmp_path: Path,
) -> None:
    """300 users over 2 workers: each worker's /stats read; counts summed, worst lag kept."""
    users = 300
    result = bench_result(
        tmp_path,
        "multiplex",
        "--users",
        str(users),
        "--workers",
        "2",
        "--sources",
        "2",
        "--duration",
        "8",
        "--delay",
        "1",
    )
    server = result["server"]
    workers = server["workers"]
    assert len(workers) == 2
    assert len({w["pid"] for w in workers}) == 2
    assert server["pid"] == [w["pid"] for w in workers]
    assert all(w["accepted_connections"] > 0 for w in workers)  # the kernel used both
    assert server["accepted_connections"] == sum(w["accepted_connections"] for w in workers)
    assert users <= server["accepted_connections"] <= users + 2
    assert server["peak_open_connections"] == sum(w["peak_open_connections"] for w in workers)
    assert server["peak_open_connections"] >= users
    assert server["requests"] == sum(w["requests"] for w in workers)
    assert server["lag_ms"]["p99"] == max(w["lag_ms"]["p99"] for w in workers)
    assert server["rss_kb_per_connection"] == max(w["rss_kb_per_connection"] for w in workers)
    assert result["failures"] == 0
    assert result["load_generator"]["sources"] == ["127.0.0.1", "127.0.0.2"]
    assert result["load_generator"]["rss_kb_per_user"] > 0
    assert result["params"]["preflight"]["machine_changes"] == []
    stats_pids = {
        json.loads(line)["pid"]
        for line in (tmp_path / "server_stats.jsonl").read_text().splitlines()
    }
    assert stats_pids == {w["pid"] for w in workers}


def test_the_load_ends_when_locusts_run_time_is_up() -> None:
    """Requests that finish while locust stops its users end after the load, not within it."""
    assert load_end(1_000.0 + 312.0, locust_started=1_000.0, duration_s=300.0) == 1_300.0
    assert load_end(1_000.0 + 250.0, locust_started=1_000.0, duration_s=300.0) == 1_250.0
