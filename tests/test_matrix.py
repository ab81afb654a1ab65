"""`loop-lab matrix`: what its report marks and warns about, and how it reads its arguments.

The containers themselves run in CI's `make matrix-quick` (a real engine, two interpreters).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from app.bench.matrix import base_images
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
    ratio = {"median": 1.05, "min": 1.03, "max": 1.03 * spread, "spread": spread}
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
    done = subprocess.run(
        [sys.executable, "-m", "app", "matrix", "--pythons", bad],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
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
    """From a checkout: git's short commit; an installed copy (no git) reports LOOP_LAB_SOURCE."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert (source_version() or "").removesuffix("+dirty") == head.stdout.strip()
    monkeypatch.setenv("LOOP_LAB_SOURCE", "abc1234")
    assert source_version() == "abc1234"
