"""`--gc`: how the server runs CPython's garbage collector, and the pauses it reports."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from app.config import GC_MODES, SettingError, Settings, build_settings
from app.gctune import SHIPPED_THRESHOLDS, SWEEP_INTERVAL_S, TUNED_THRESHOLDS, YoungSweeper
from app.launch import running_server
from tests.deploy_support import http_get, http_json
from tests.test_cli import serve_process

GC_LINE = "loop_lab.gc: garbage collector"


@contextmanager
def serve_logged(*args: str) -> Iterator[tuple[str, list[str]]]:
    """`python -m app serve` on a free port; yield its URL and every log line up to readiness."""
    lines: list[str] = []
    with serve_process(*args, log=lines) as (_, urls):
        yield urls[0], lines


def _thresholds(stats: dict[str, Any]) -> tuple[int, ...]:
    return tuple(g["threshold"] for g in stats["gc"]["generations"])


def test_gc_setting_takes_every_mode_from_flag_or_env() -> None:
    """--gc and LOOP_LAB_GC accept default/tuned/off (flag wins); tuned is the default."""
    assert Settings().gc == "tuned"
    for mode in GC_MODES:
        assert build_settings({"gc": mode}, {}).gc == mode
        assert build_settings({}, {"LOOP_LAB_GC": mode}).gc == mode
    assert build_settings({"gc": "off"}, {"LOOP_LAB_GC": "default"}).gc == "off"
    with pytest.raises(SettingError, match="LOOP_LAB_GC"):
        build_settings({}, {"LOOP_LAB_GC": "aggressive"})


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--gc", "fast"], {}, "--gc"),
        (["--gc", ""], {}, "--gc"),
        ([], {"LOOP_LAB_GC": "On"}, "LOOP_LAB_GC"),
    ],
)
def test_bad_gc_value_is_one_clear_line(args: list[str], env: dict[str, str], named: str) -> None:
    """An unknown --gc / LOOP_LAB_GC stops the start with exit 2 and one line listing the modes."""
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "default, tuned, off" in lines[0]


def test_tuned_server_freezes_startup_objects_and_raises_the_full_threshold() -> None:
    """--gc tuned: the server process froze its startup objects and runs the tuned thresholds."""
    with serve_logged("--gc", "tuned") as (url, lines):
        stats = http_json(f"{url}/stats")
    assert stats["gc"]["mode"] == "tuned"
    assert stats["gc"]["enabled"] is True
    assert stats["gc"]["frozen_objects"] > 10_000  # the imports and the app, at least
    assert _thresholds(stats) == TUNED_THRESHOLDS
    assert stats["gc"]["young_sweep_ms"] == SWEEP_INTERVAL_S * 1000
    assert sum(GC_LINE + " tuned" in line for line in lines) == 1


def test_default_server_runs_the_collector_as_shipped() -> None:
    """--gc default: nothing frozen, CPython's own thresholds, collector on."""
    with serve_logged("--gc", "default") as (url, _):
        stats = http_json(f"{url}/stats")
    assert stats["gc"]["mode"] == "default"
    assert stats["gc"]["enabled"] is True
    assert stats["gc"]["frozen_objects"] == 0
    assert stats["gc"]["young_sweep_ms"] is None
    assert _thresholds(stats) == SHIPPED_THRESHOLDS


def test_off_server_disables_the_collector() -> None:
    """--gc off: automatic collection is disabled in the server process."""
    with serve_logged("--gc", "off") as (url, _):
        stats = http_json(f"{url}/stats")
    assert stats["gc"]["mode"] == "off"
    assert stats["gc"]["enabled"] is False


def test_every_worker_applies_the_mode_and_logs_it_once() -> None:
    """--workers 2 --gc tuned: each worker process logs the collector setting exactly once."""
    with serve_logged("--workers", "2", "--gc", "tuned") as (_, lines):
        gc_lines = [line for line in lines if GC_LINE in line]
    assert len(gc_lines) == 2, gc_lines
    assert all(" tuned: gc.freeze()" in line for line in gc_lines)


def _pause_count(metrics: str, generation: int) -> float:
    match = re.search(
        rf'^looplab_gc_pause_seconds_count{{generation="{generation}"}} (\S+)$', metrics, re.M
    )
    assert match, metrics
    return float(match.group(1))


def test_pause_metric_and_stats_count_every_collection() -> None:
    """Each collection in the server's process adds one to /stats and looplab_gc_pause_seconds."""
    with running_server("asyncio", gc="default") as server:
        before = http_json(f"{server.url}/stats")["gc"]["generations"][2]["collections"]
        for _ in range(3):
            gc.collect(2)  # same process as the in-thread server: its collector counts these
        stats = http_json(f"{server.url}/stats")["gc"]["generations"][2]
        answer = http_get(f"{server.url}/metrics")
    assert answer is not None
    assert stats["collections"] >= before + 3
    assert stats["pause_ms_max"] > 0
    assert _pause_count(answer[1].decode(), 2) >= stats["collections"]  # read after /stats


def test_collector_is_restored_when_the_last_server_stops() -> None:
    """A tuned server in this process unfreezes and restores the thresholds when it stops."""
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    with running_server("asyncio", gc="tuned"):
        assert gc.get_threshold() == TUNED_THRESHOLDS
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0
    assert gc.isenabled() is enabled


async def test_young_sweeper_collects_on_the_clock_and_stops() -> None:
    """The sweeper collects generation 0 each tick and 1 every per_middle-th, until stopped."""
    swept: list[int] = []
    done = asyncio.Event()
    sweeper = YoungSweeper(interval=0.005, per_middle=3)

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and sweeper.sweeps > len(swept):  # this tick's collection
            swept.append(info["generation"])
            if len(swept) == 9:
                done.set()

    gc.callbacks.append(on_gc)
    try:
        sweeper.start(asyncio.get_running_loop())
        await asyncio.wait_for(done.wait(), timeout=30)
        sweeper.stop()
    finally:
        gc.callbacks.remove(on_gc)
    assert swept == [0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert sweeper._timer is None  # nothing left armed on the loop
