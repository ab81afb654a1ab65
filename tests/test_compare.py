"""`loop-lab compare`: alternating rounds, paired ratios, target URLs and the concurrency sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.bench.bench import BenchConfig
from app.bench.compare import notes_for, run_order, summarize
from app.launch import running_server


def run_compare(out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "app", "compare", *args, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "uvloop/asyncio rps: median" in proc.stdout
    data: dict[str, Any] = json.loads((out / "compare.json").read_text())
    return data


def fake_run(loop: str, n: int, rps: float, p99: float) -> dict[str, Any]:
    result = {
        "rps": rps,
        "latency_ms": {"p50": p99 / 2, "p99": p99},
        "server": {
            "lag_ms": {"p99": 1.0},
            "cpu_ms_per_request": None,
            "rss_kb_per_connection": 10.0,
        },
    }
    return {"loop": loop, "round": n, "result": result}


@pytest.mark.slow
def test_compare_alternates_loops_and_pairs_ratios_by_round(tmp_path: Path) -> None:
    """Two rounds run asyncio, uvloop, uvloop, asyncio; ratios are uvloop/asyncio per round."""
    data = run_compare(
        tmp_path, "--rounds", "2", "--users", "30", "--duration", "3", "--delay", "0.1"
    )
    assert data["scenario"] == "multiplex"
    order = [(run["round"], run["loop"]) for run in data["rounds"]]
    assert order == [(1, "asyncio"), (1, "uvloop"), (2, "uvloop"), (2, "asyncio")]
    for run in data["rounds"]:
        assert run["result"]["loop"] == run["loop"]  # the server really ran that loop
        assert run["result"]["requests"] > 0
    by = {(run["round"], run["loop"]): run["result"] for run in data["rounds"]}
    expected = [by[(n, "uvloop")]["rps"] / by[(n, "asyncio")]["rps"] for n in (1, 2)]
    assert data["ratio"]["rps"]["per_round"] == pytest.approx(expected, rel=1e-3)
    assert (
        data["ratio"]["rps"]["min"] <= data["ratio"]["rps"]["median"] <= data["ratio"]["rps"]["max"]
    )
    assert set(data["ratio"]["p99"]) >= {"median", "min", "max"}
    for loop in ("asyncio", "uvloop"):
        assert set(data["summary"][loop]) >= {"rps", "p50_ms", "p99_ms", "lag_p99_ms"}
        p99s = [by[(n, loop)]["latency_ms"]["p99"] for n in (1, 2)]
        assert data["summary"][loop]["p99_ms"] == pytest.approx(sum(p99s) / 2, abs=1e-3)
    assert "asyncio vs uvloop" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "round-2-uvloop" / "result.json").is_file()


@pytest.mark.slow
def test_compare_sweeps_running_servers_given_by_url(tmp_path: Path) -> None:
    """--asyncio-url/--uvloop-url bench running servers; --sweep adds one level per user count."""
    with running_server("asyncio") as a, running_server("uvloop") as u:
        data = run_compare(
            tmp_path,
            "--asyncio-url",
            a.url,
            "--uvloop-url",
            u.url,
            "--rounds",
            "1",
            "--sweep",
            "30,10",
            "--duration",
            "3",
            "--delay",
            "0.1",
        )
    points = [(p["users"], p["loop"], p["result"]["loop"]) for p in data["sweep"]]
    assert sorted(points) == [
        (10, "asyncio", "asyncio"),
        (10, "uvloop", "uvloop"),
        (30, "asyncio", "asyncio"),
        (30, "uvloop", "uvloop"),
    ]
    assert data["users"] == 30  # the headline comparison is the largest level
    assert [level["users"] for level in data["sweep_levels"]] == [10, 30]
    for point in data["sweep"]:
        assert point["result"]["server"]["peak_open_connections"] >= point["users"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Sweep" in (tmp_path / "compare.md").read_text()


def test_rounds_alternate_which_loop_goes_first() -> None:
    """Odd rounds start with asyncio, even rounds with uvloop, so drift hits both loops alike."""
    assert [run_order(n) for n in (1, 2, 3)] == [
        ("asyncio", "uvloop"),
        ("uvloop", "asyncio"),
        ("asyncio", "uvloop"),
    ]


def test_summary_takes_medians_and_paired_ratios() -> None:
    """Summary figures are medians per loop; ratios pair uvloop with asyncio of the same round."""
    runs = [
        fake_run("asyncio", 1, 100, 10),
        fake_run("uvloop", 1, 110, 9),
        fake_run("uvloop", 2, 120, 8),
        fake_run("asyncio", 2, 100, 10),
        fake_run("asyncio", 3, 50, 20),
        fake_run("uvloop", 3, 60, 16),
    ]
    summary, ratio = summarize(runs)
    assert summary["asyncio"]["rps"] == 100
    assert summary["uvloop"]["rps"] == 110
    assert summary["asyncio"]["p99_ms"] == 10
    assert ratio["rps"]["per_round"] == [1.1, 1.2, 1.2]
    assert (ratio["rps"]["median"], ratio["rps"]["min"], ratio["rps"]["max"]) == (1.2, 1.1, 1.2)
    assert ratio["p99"]["per_round"] == [0.9, 0.8, 0.8]
    assert ratio["rps"]["spread"] == pytest.approx(1.2 / 1.1, abs=1e-4)
    assert "cpu_per_request" not in ratio  # not measured (remote servers): not invented


def test_notes_flag_a_wide_spread_and_a_paced_rate() -> None:
    """compare.md says when rounds disagree by over 10% and when pacing, not the loop, sets rps."""
    runs = [fake_run("asyncio", 1, 100, 10), fake_run("uvloop", 1, 100, 10)]
    runs += [fake_run("asyncio", 2, 100, 10), fake_run("uvloop", 2, 130, 10)]
    summary, ratio = summarize(runs)
    level = {"users": 1000, "summary": summary, "ratio": ratio}
    notes = notes_for(level, BenchConfig(scenario="multiplex", out=Path("x"), delay_s=1.0))
    assert any("rps ratios spread by 30.0%" in note for note in notes)
    assert any("users/delay = 1,000 rps" in note for note in notes)
