"""The bench's preflight: sizes from the machine's limits, and one clear refusal before anything."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from app.bench.preflight import (
    Machine,
    PreflightError,
    fewest_workers,
    plan_run,
    server_max_connections,
)

# this machine's limits, as the issue states them
HERE = Machine(
    nofile_hard=20_000,
    nofile_soft=20_000,
    port_range=(32768, 60999),
    somaxconn=4096,
    mem_available_mb=24_000.0,
    cpus=2,
    time_wait=0,
)


def test_one_loop_at_19000_fits_with_locust_split_by_fds() -> None:
    """19,000 users on one server: max-connections from the fd limit, no locust process over it."""
    plan = plan_run(19_000, auto_processes=1, machine=HERE)
    assert plan.workers == 1
    assert 19_002 <= plan.max_connections == server_max_connections(20_000) < 20_000
    assert plan.locust_processes >= 2
    assert 19_000 / plan.locust_processes < 20_000 * 0.9
    assert plan.sources == ()  # 19,000 fits one source/destination pair's 28,232 ports


def test_100000_across_workers_spreads_over_loopback_sources() -> None:
    """100,000 users: enough server workers and locust processes, several 127.0.0.x sources."""
    workers = fewest_workers(100_000, HERE)
    plan = plan_run(100_000, workers=workers, auto_processes=2, machine=HERE)
    assert 100_000 * 1.1 / workers <= plan.max_connections
    assert plan.locust_processes >= 6
    assert len(plan.sources) >= 4
    assert all(s.startswith("127.0.0.") for s in plan.sources)
    assert 100_000 / len(plan.sources) < 28_232
    assert plan.as_dict()["machine_changes"] == []


@pytest.mark.parametrize(
    ("users", "kwargs", "machine", "names"),
    [
        (100_000, {"workers": 2}, HERE, ["RLIMIT_NOFILE", "--workers 6"]),
        (19_000, {"processes": 1}, HERE, ["RLIMIT_NOFILE", "--processes 2"]),
        (
            30_000,
            {"local_target": False},
            HERE,
            ["ephemeral ports", "ip_local_port_range", "127.0.0.x"],
        ),
        (
            100_000,
            {"workers": 6},
            replace(HERE, mem_available_mb=2_000.0),
            ["MB", "available", "docs/benchmarks.md"],
        ),
    ],
)
def test_an_impossible_size_is_refused_naming_the_limit_and_the_fix(
    users: int, kwargs: dict[str, object], machine: Machine, names: list[str]
) -> None:
    """Each limit refuses with a message that names it and says what to do."""
    with pytest.raises(PreflightError) as exc:
        plan_run(users, machine=machine, **kwargs)  # type: ignore[arg-type]
    for name in names:
        assert name in str(exc.value)


def test_the_cli_refuses_before_starting_anything(tmp_path: Path) -> None:
    """`bench --users 1000000` on one server exits 2 with one line, no traceback, no output dir."""
    out = tmp_path / "never"
    argv = ["bench", "multiplex", "--users", "1000000", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "app", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("loop-lab bench: refused before starting: ")
    assert "RLIMIT_NOFILE" in proc.stderr
    assert "--workers" in proc.stderr
    assert not out.exists()


def test_a_sweep_level_runs_on_the_fewest_workers_that_hold_it(tmp_path: Path) -> None:
    """compare --sweep: small levels keep --workers, a level past one process's fds gets more."""
    from app.bench.bench import BenchConfig
    from app.bench.compare import CompareConfig

    config = CompareConfig(
        base=BenchConfig(scenario="multiplex", out=tmp_path), sweep=(1000, 100_000)
    )
    assert config.level_config(1000).workers == 1
    big = config.level_config(100_000)
    assert big.workers == fewest_workers(100_000) > 1
    assert big.users == 100_000


def test_a_rate_beyond_the_cores_is_named_before_the_run() -> None:
    """users/delay past what the cores drive gets a note naming the rate and the cores."""
    busy = plan_run(19_000, rate=1_900.0, machine=HERE)
    assert any("1,900 requests/s" in note and "cores" in note for note in busy.notes)
    calm = plan_run(19_000, rate=19_000 / 60, machine=HERE)
    assert not any("requests/s" in note for note in calm.notes)
