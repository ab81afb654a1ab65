"""scripts/overhead.py: wrk parsing, ratio math, and its real server start/stop."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from app.bench.wrk import WrkError, parse_wrk
from app.monitor.process import cpu_seconds
from scripts import overhead

# Captured from Debian's wrk 4.1.0 on this project's bare server.
CLEAN_RUN = """\
Running 1s test @ http://127.0.0.1:40799/healthz
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   402.90us  333.36us   4.67ms   96.39%
    Req/Sec    27.34k     4.55k   34.66k    60.00%
  27165 requests in 1.00s, 3.99MB read
Requests/sec:  27146.19
Transfer/sec:      3.99MB
"""

REJECTED_RUN = """\
Running 1s test @ http://127.0.0.1:40799/await?delay=x
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   781.15us    0.95ms  12.38ms   94.39%
    Req/Sec    15.84k     2.15k   20.45k    81.82%
  17323 requests in 1.10s, 4.97MB read
  Non-2xx or 3xx responses: 17323
Requests/sec:  15748.25
Transfer/sec:      4.52MB
"""

SOCKET_ERRORS_RUN = """\
Running 10s test @ http://127.0.0.1:8080/healthz
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52s   210.10ms   1.99s    90.12%
    Req/Sec    30.43k     1.20k   32.10k    80.00%
  302866 requests in 1.00m, 47.08MB read
  Socket errors: connect 0, read 3, write 0, timeout 12
Requests/sec:   5047.77
Transfer/sec:      4.71MB
"""


def test_parse_wrk_reads_a_clean_run() -> None:
    """A clean wrk summary gives requests, duration, rps and mean latency in ms."""
    result = parse_wrk(CLEAN_RUN)
    assert result.requests == 27165
    assert result.duration_s == pytest.approx(1.0)
    assert result.rps == pytest.approx(27146.19)
    assert result.latency_avg_ms == pytest.approx(0.40290)
    assert result.clean


def test_parse_wrk_counts_errors_and_units() -> None:
    """Non-2xx answers and socket errors make a run unclean; s and m units convert."""
    rejected = parse_wrk(REJECTED_RUN)
    assert rejected.non_2xx == 17323
    assert not rejected.clean
    errors = parse_wrk(SOCKET_ERRORS_RUN)
    assert errors.socket_errors == 15
    assert errors.duration_s == pytest.approx(60.0)
    assert errors.latency_avg_ms == pytest.approx(1520.0)
    assert not errors.clean


def test_parse_wrk_rejects_other_output() -> None:
    """Output that is not a wrk summary is an error, not a zero."""
    with pytest.raises(WrkError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_ratios_are_paired_by_round() -> None:
    """Each ratio is loop-lab/bare of the same round; rounds must pair up."""
    assert overhead.paired_ratios([100.0, 200.0], [95.0, 150.0]) == [0.95, 0.75]
    with pytest.raises(ValueError, match="unpaired"):
        overhead.paired_ratios([100.0], [95.0, 90.0])


def test_target_is_judged_on_the_median_ratio() -> None:
    """A path meets its target when the median paired ratio does, whatever one round did."""
    result = overhead.PathResult("asyncio", "/healthz", 0.95)
    result.bare_rps = [100.0, 100.0, 100.0]
    result.lab_rps = [90.0, 96.0, 97.0]
    spread = result.ratio
    assert (spread.median, spread.min, spread.max) == pytest.approx((0.96, 0.90, 0.97))
    assert result.met
    result.lab_rps = [90.0, 94.0, 99.0]
    assert not result.met
    table = overhead.markdown_table([result])
    assert "| asyncio | `/healthz` | 100 | 94 | 0.940 | 0.900 | 0.990 | ≥ 0.95 | NO |" in table


def test_cpu_seconds_reads_this_process() -> None:
    """/proc gives this process's CPU time, growing as it works."""
    before = cpu_seconds(os.getpid())
    assert before is not None
    sum(i * i for i in range(2_000_000))
    after = cpu_seconds(os.getpid())
    assert after is not None
    assert after > before


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        with exc:  # an unclosed error response is a ResourceWarning on 3.14+
            body, status = exc.read(), exc.code
    return status, json.loads(body) if body.startswith(b"{") else body


async def test_servers_start_answer_alike_and_stop(tmp_path: Path) -> None:
    """The servers start on free ports, answer the same shapes, and exit 0 on SIGTERM."""
    async with (
        overhead.run_server("bare", overhead.bare_command("asyncio", None), tmp_path) as bare,
        overhead.run_server("lab", overhead.lab_command("asyncio", None), tmp_path) as lab,
        overhead.run_server(
            "otel", overhead.bare_command("asyncio", None, otel=True), tmp_path
        ) as otel,
    ):
        servers = (bare, lab, otel)
        assert len({s.url for s in servers}) == 3
        keys = []
        for server in servers:
            assert await asyncio.to_thread(_get, f"{server.url}/healthz") == (200, b"ok")
            status, body = await asyncio.to_thread(_get, f"{server.url}/await?delay=0")
            assert status == 200
            assert body["pid"] == server.pid
            keys.append(set(body))
            status, body = await asyncio.to_thread(_get, f"{server.url}/await?delay=nan")
            assert status == 400
            assert set(body) == {"error", "param", "allowed"}
        wrk = shutil.which("wrk")
        if wrk is not None:  # the load generator is optional for `make test`
            for server in servers:
                run = overhead.run_wrk(wrk, f"{server.url}/healthz", 1, 4, None)
                assert run.clean
                assert run.requests > 0
    assert keys[0] == keys[1] == keys[2]  # the same body on every side
    assert [s.proc.returncode for s in servers if s.proc is not None] == [0, 0, 0]


def test_missing_wrk_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without wrk and with --no-install the script exits 2 and says what to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    code = overhead.main(["--rounds", "1", "--duration", "1", "--no-install"], out=io.StringIO())
    assert code == 2
    assert "apt-get install wrk" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown loops or zero rounds are refused before anything starts."""
    assert overhead.main(["--loops", "trio"], out=io.StringIO()) == 2
    assert overhead.main(["--rounds", "0"], out=io.StringIO()) == 2
    assert "--rounds >= 1" in capsys.readouterr().err


def test_pinning_needs_two_distinct_cpus() -> None:
    """CPU pinning is used only for two different CPUs this process may run on."""
    assert overhead.choose_cpus(0, 0) == (None, None)
    assert overhead.choose_cpus(0, 10_000) == (None, None)
