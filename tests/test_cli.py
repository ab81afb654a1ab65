"""The CLI as users run it: real subprocesses, signals and ports."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest

from app.cli import build_parser
from app.config import SettingError, Settings, build_settings

SERVING = re.compile(r"serving on (http://\S+) \(loop=(\w+), pid=(\d+)")


@contextmanager
def serve_process(
    *args: str, env: dict[str, str] | None = None, log: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start `python -m app serve` on a free port; yield once it logs every worker's URL.

    `log`, if given, receives every log line up to then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    workers = 1
    if "--workers" in args:
        workers = int(args[args.index("--workers") + 1])
    urls: list[str] = []
    lines = [] if log is None else log
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while len(urls) < workers:
            line = proc.stderr.readline()
            assert line, f"server exited early with {proc.wait()}: {''.join(lines)}"
            assert time.monotonic() < deadline, "server not ready in 60 s"
            lines.append(line)
            match = SERVING.search(line)
            if match:
                urls.append(match.group(1))
        yield proc, urls
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "http"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        (["--loop", "trio"], {}, "--loop"),
        (["--max-delay", "nan"], {}, "--max-delay"),
        (["--workers", "0"], {}, "--workers"),
        ([], {"LOOP_LAB_BACKLOG": "-5"}, "LOOP_LAB_BACKLOG"),
        ([], {"LOOP_LAB_DEBUG": "maybe"}, "LOOP_LAB_DEBUG"),
        (["--lag-interval", "0"], {}, "--lag-interval"),
        # the watchdog's heartbeat is the lag tick: one slower than the threshold is a stall
        (["--lag-interval", "1", "--stall-threshold", "0.5"], {}, "--stall-threshold (0.5)"),
    ],
)
def test_bad_setting_is_one_clear_line(args: list[str], env: dict[str, str], named: str) -> None:
    """A bad flag or env var stops the start with exit 2 and one line naming it, no traceback."""
    result = _run_cli("serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_flags_win_over_env_over_defaults() -> None:
    """build_settings: a flag beats its env var, an env var beats the default."""
    env = {"LOOP_LAB_PORT": "9000", "LOOP_LAB_LOOP": "uvloop", "LOOP_LAB_DEBUG": "yes"}
    settings = build_settings({"port": "9001"}, env)
    assert settings.port == 9001
    assert settings.loop == "uvloop"
    assert settings.debug is True
    assert build_settings({}, {}) == Settings()
    assert Settings().host == "127.0.0.1"
    with pytest.raises(SettingError, match="LOOP_LAB_PORT"):
        build_settings({}, {"LOOP_LAB_PORT": "x"})


def test_database_and_upstream_settings_are_validated() -> None:
    """--database-url takes postgresql:// URLs, --upstream-url http(s) ones; timeouts bounded."""
    url = "postgresql://app@127.0.0.1:5432/app"
    assert build_settings({}, {"LOOP_LAB_DATABASE_URL": url}).database_url == url
    assert build_settings({"upstream_url": "http://127.0.0.1:9/"}, {}).upstream_url == (
        "http://127.0.0.1:9"
    )
    for flags, named in (
        ({"database_url": "mysql://x@y/z"}, "--database-url"),
        ({"upstream_url": "127.0.0.1:9"}, "--upstream-url"),
        ({"db_connect_timeout": "0"}, "--db-connect-timeout"),
        ({"db_query_timeout": "nan"}, "--db-query-timeout"),
        ({"db_pool_size": "0"}, "--db-pool-size"),
        ({"default_executor_workers": "0"}, "--default-executor-workers"),
    ):
        with pytest.raises(SettingError, match=named):
            build_settings(flags, {})


def test_no_flag_switches_off_what_env_switched_on() -> None:
    """--no-debug / --no-access-log win over LOOP_LAB_DEBUG=1 / LOOP_LAB_ACCESS_LOG=1."""
    parser = build_parser()
    env = {"LOOP_LAB_DEBUG": "1", "LOOP_LAB_ACCESS_LOG": "1"}
    args = parser.parse_args(["serve", "--no-debug", "--no-access-log"])
    settings = build_settings(vars(args), env)
    assert settings.debug is False
    assert settings.access_log is False
    assert build_settings(vars(parser.parse_args(["serve"])), env).debug is True
    assert build_settings(vars(parser.parse_args(["serve", "--debug"])), {}).debug is True


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_env_selects_uvloop_and_responses_report_it() -> None:
    """LOOP_LAB_LOOP=uvloop runs uvloop, and /stats and responses say so from the real loop."""
    with serve_process(env={"LOOP_LAB_LOOP": "uvloop"}) as (_, urls):
        async with aiohttp.ClientSession() as session:
            stats = await _json(session, f"{urls[0]}/stats")
            body = await _json(session, f"{urls[0]}/await?delay=0")
    assert stats["loop"] == body["loop"] == "uvloop"


async def test_sigterm_with_200_in_flight_loses_none() -> None:
    """SIGTERM while 200 /await requests are in flight: all 200 answer 200 and the exit is 0."""
    with serve_process("--grace", "20") as (proc, urls):
        url = urls[0]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            requests = [
                asyncio.create_task(_json(session, f"{url}/await?delay=1.5")) for _ in range(200)
            ]
            deadline = time.monotonic() + 20
            while (await _json(session, f"{url}/stats"))["in_flight"] < 201:  # +1: /stats itself
                assert time.monotonic() < deadline, "requests never all in flight"
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            bodies = await asyncio.gather(*requests)
        assert len(bodies) == 200
        assert all(body["mode"] == "await" for body in bodies)
        assert proc.wait(timeout=30) == 0


async def test_two_workers_answer_from_two_pids() -> None:
    """--workers 2 starts two processes on one port (SO_REUSEPORT); both answer."""
    with serve_process("--workers", "2") as (proc, urls):
        assert len(set(urls)) == 1, urls
        pids: set[int] = set()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            for _ in range(200):
                pids.add((await _json(session, f"{urls[0]}/await?delay=0"))["pid"])
                if len(pids) == 2:
                    break
        assert len(pids) == 2
        assert proc.pid not in pids
    assert proc.returncode == 0


def test_low_fd_hard_limit_is_reported_plainly() -> None:
    """Under a 1024 hard fd limit the server raises the soft limit to it and warns 10k won't fit."""
    # prlimit (util-linux) rather than preexec_fn, which is unsafe in a threaded test process
    proc = subprocess.Popen(
        ["prlimit", "--nofile=256:1024", sys.executable, "-m", "app", "serve", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("serving on" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "server exited early"
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    text = "".join(lines)
    assert "RLIMIT_NOFILE soft limit 1024 (hard 1024)" in text
    assert "too low for 10000 connections" in text


async def test_debug_mode_reports_the_slow_callback() -> None:
    """--debug turns on asyncio debug mode: a 200 ms /block is logged as a slow callback."""
    with serve_process("--debug") as (proc, urls):
        async with aiohttp.ClientSession() as session:
            await _json(session, f"{urls[0]}/block?delay=0.2")
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        rest = proc.stderr.read()
    assert re.search(r"Executing <Task .* took 0\.2\d\d seconds", rest), rest[-2000:]
