"""`loop-lab matrix`: what its report marks and warns about, and how it reads its arguments.

The containers themselves run in CI's `make matrix-quick` (a real engine, two interpreters).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpServer

from app.bench.instructions import per_request_counts
from app.bench.matrix import base_images, instruction_ratio
from app.bench.matrix_report import broken_cells, changed_claims, matrix_notes, matrix_report
from app.bench.results import source_version


def _cell(python: str, loop: str, verdicts: dict[str, str], **saturated: Any) -> dict[str, Any]:
    path = {
        "rps": 10_000.0,
        "cpu_us_per_request": 90.0,
        "server_cpu_share": 0.99,
        "generator_cpu_share": 0.4,
        "server_bound": True,
        **saturated,
    }
    return {
        "python": python,
        "python_full": f"{python}.1",
        "loop": loop,
        "versions": {"python": f"{python}.1", "aiohttp": "3.14.5", "uvloop": "0.23.0"},
        "claims": [
            {"id": i, "verdict": v, "evidence": f"{i} on {python}"} for i, v in verdicts.items()
        ],
        "saturated": {"/healthz": path},
        "multiplex": {
            "failures": 0,
            "p99_ms": 10_050.0,
            "lag_p99_ms": 4.0,
            "lag_max_ms": 9.0,
            "peak_open_connections": 10_001,
            "rss_kb_per_connection": 11.5,
            "cpu_us_per_request": 300.0,
            "load_generator_cpu_warning": False,
        },
    }


def _data(cells: list[dict[str, Any]], spread: float = 1.01, rounds: int = 3) -> dict[str, Any]:
    pythons = list(dict.fromkeys(c["python"] for c in cells))
    ratio = {"median": 1.03 * (1 + spread) / 2, "min": 1.03, "max": 1.03 * spread, "spread": spread}
    return {
        "pythons": pythons,
        "rounds": rounds,
        "wrk": {"duration_s": 10, "connections": 50},
        "multiplex": {"users": 10_000, "delay_s": 10, "duration_s": 60},
        "cells": cells,
        "ratio": {p: {"/healthz": ratio} for p in pythons},
        "command": ["loop-lab", "matrix"],
        "source": "abc1234",
        "machine": {"cpus": 2, "cpu_model": "x", "memory_gb": 24, "kernel": "6", "python": "3.11"},
    }


def _matrix_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`loop-lab matrix ARGS` as a subprocess."""
    argv = [sys.executable, "-m", "app", "matrix", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_a_verdict_is_marked_where_it_differs_from_the_first_interpreter_on_its_loop() -> None:
    """Only cells whose verdict differs from the same loop on the first interpreter are marked."""
    cells = [
        _cell("3.11", "asyncio", {"eager": "true", "timers": "true"}),
        _cell("3.11", "uvloop", {"eager": "true", "timers": "false"}),
        _cell("3.14", "asyncio", {"eager": "false", "timers": "true"}),
        _cell("3.14", "uvloop", {"eager": "true", "timers": "false"}),
    ]
    assert changed_claims(cells) == {
        "3.11.1 asyncio": set(),
        "3.11.1 uvloop": set(),
        "3.14.1 asyncio": {"eager"},
        "3.14.1 uvloop": set(),
    }
    report = matrix_report(_data(cells))
    assert "| eager | true | true | **false** | true |" in report
    assert "| timers | true | false | true | false |" in report
    assert "  - 3.14.1 asyncio: eager on 3.14" in report  # the evidence of a changed claim


def test_a_cell_the_server_did_not_saturate_is_flagged_with_the_reason() -> None:
    """Server under 90% of its CPU: wrk's share decides whether wrk or other load is to blame."""
    starved = {"server_cpu_share": 0.6, "server_bound": False}
    cells = [
        _cell("3.11", "asyncio", {}, generator_cpu_share=0.95, **starved),
        _cell("3.11", "uvloop", {}, generator_cpu_share=0.3, **starved),
    ]
    notes = matrix_notes(_data(cells))
    assert any("asyncio /healthz" in n and "wrk, not the server, set the pace" in n for n in notes)
    assert any("uvloop /healthz" in n and "other load on the machine" in n for n in notes)
    assert "⚠" in matrix_report(_data(cells))


def test_a_ratio_spread_over_five_percent_is_reported() -> None:
    """Paired uvloop/asyncio ratios further apart than 5% get a note; within 5% none."""
    cells = [_cell("3.13", "asyncio", {}), _cell("3.13", "uvloop", {})]
    assert matrix_notes(_data(cells, spread=1.02)) == []
    assert any("spread" in n for n in matrix_notes(_data(cells, spread=1.08)))
    assert matrix_notes(_data(cells, spread=1.08, rounds=1)) == []  # one round: nothing to pair


def test_each_interpreter_maps_to_the_official_image_names() -> None:
    """3.11 is the Dockerfile's own default; newer interpreters take Debian trixie images."""
    assert base_images("3.11") == ("python:3.11-slim-bookworm", "python:3.11-bookworm")
    assert base_images("3.14") == ("python:3.14-slim-trixie", "python:3.14-trixie")


@pytest.mark.parametrize("bad", ["3", "3.x", "2.7,", "", "3.11;rm"])
def test_pythons_must_be_versions(bad: str) -> None:
    """--pythons takes X.Y versions only; anything else is a usage error naming the flag."""
    done = _matrix_cli("--pythons", bad)
    assert done.returncode == 2
    assert "--pythons" in done.stderr


def test_a_claim_that_failed_to_run_or_a_failed_request_breaks_the_run() -> None:
    """broken_cells names the cell and what broke; a clean matrix has none (exit 0)."""
    clean = _cell("3.14", "asyncio", {"eager": "false"})
    errored = _cell("3.14", "uvloop", {"eager": "error"})
    failing = _cell("3.15", "asyncio", {})
    failing["multiplex"]["failures"] = 3
    assert broken_cells(_data([clean])) == []
    assert broken_cells(_data([clean, errored, failing])) == [
        "3.14.1 uvloop: claim eager failed to run",
        "3.15.1 asyncio: 3 requests failed under load",
    ]


def test_source_version_is_the_checkouts_commit_or_what_the_builder_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a checkout: git's short commit (none without git, as in the interpreters' test
    containers); an installed copy reports LOOP_LAB_SOURCE."""
    if shutil.which("git") is None:
        assert source_version() is None
    else:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        assert (source_version() or "").removesuffix("+dirty") == head.stdout.strip()
    monkeypatch.setenv("LOOP_LAB_SOURCE", "abc1234")
    assert source_version() == "abc1234"


def test_instructions_give_a_uvloop_over_asyncio_ratio_per_interpreter_and_a_table() -> None:
    """Each interpreter's callgrind counts become a uvloop/asyncio ratio and a report section."""
    cells = [_cell(p, loop, {}) for p in ("3.11", "3.14") for loop in ("asyncio", "uvloop")]
    counts = {("3.11", "asyncio"): 200_000, ("3.11", "uvloop"): 180_000}
    counts |= {("3.14", "asyncio"): 160_000, ("3.14", "uvloop"): 176_000}
    for cell in cells:
        cell["instructions"] = {"/healthz": counts[(cell["python"], cell["loop"])]}
        cell["idle_instructions_per_s"] = 3_000_000
    ratios = instruction_ratio(cells)
    assert ratios == {"3.11": {"/healthz": 0.9}, "3.14": {"/healthz": 1.1}}
    report = matrix_report({**_data(cells), "instruction_ratio": ratios})
    assert "| `/healthz` | 200,000 | 180,000 | 160,000 | 176,000 |" in report
    assert "| 3.14 | 1.100 |" in report
    without = [_cell("3.11", "asyncio", {})]
    assert "Instructions per request" not in matrix_report(_data(without))


async def test_batches_count_per_request_work_apart_from_the_clocks(
    aiohttp_server: AiohttpServer,
) -> None:
    """On a real server: (N2 batch - N1 batch) / (N2 - N1) is one request; what runs on a clock
    (here 200,000 a second) inflates `counted` and `unclocked` takes it out again."""
    served = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", hello)
    server = await aiohttp_server(app)
    last, last_at = 0, time.monotonic()

    async def dump() -> int:
        nonlocal last, last_at
        now = time.monotonic()
        since, last = served - last, served
        clock, last_at = 200_000 * (now - last_at), now
        return round(1_000 * since + clock)  # 1,000 "instructions" a request, plus the clock

    url = f"http://127.0.0.1:{server.port}"
    clock_per_s, figures = await per_request_counts(
        url, {"/healthz": (30, 130)}, 4, dump, idle_s=0.2
    )
    assert clock_per_s == pytest.approx(200_000, rel=0.01)
    assert figures["/healthz"].counted > 1_000
    assert figures["/healthz"].unclocked == pytest.approx(1_000, rel=0.02)
    assert served == 30 + 30 + 130  # warm-up: N1 requests


def test_combine_joins_runs_of_one_setting_into_one_report(tmp_path: Path) -> None:
    """`matrix --combine A B` measures nothing: one matrix.json/md with every run's cells and
    commands; runs with other settings are refused with exit 3."""
    for python in ("3.11", "3.15"):
        run = {**_data([_cell(python, "asyncio", {}), _cell(python, "uvloop", {})])}
        run["command"] = ["loop-lab", "matrix", "--pythons", python]
        (tmp_path / python).mkdir()
        (tmp_path / python / "matrix.json").write_text(json.dumps(run))
    runs = [str(tmp_path / "3.11"), str(tmp_path / "3.15")]
    done = _matrix_cli("--out", str(tmp_path / "all"), "--combine", *runs)
    assert done.returncode == 0, done.stderr
    joined = json.loads((tmp_path / "all" / "matrix.json").read_text())
    assert [(c["python"], c["loop"]) for c in joined["cells"]] == [
        ("3.11", "asyncio"),
        ("3.11", "uvloop"),
        ("3.15", "asyncio"),
        ("3.15", "uvloop"),
    ]
    assert set(joined["ratio"]) == {"3.11", "3.15"}
    report = (tmp_path / "all" / "matrix.md").read_text()
    assert "loop-lab matrix --pythons 3.15" in report
    assert "| 3.15.1 asyncio |" in report

    other = json.loads((tmp_path / "3.15" / "matrix.json").read_text())
    (tmp_path / "3.15" / "matrix.json").write_text(json.dumps({**other, "rounds": 1}))
    done = _matrix_cli("--out", str(tmp_path / "all"), "--combine", *runs)
    assert done.returncode == 3
    assert "rounds" in done.stderr
