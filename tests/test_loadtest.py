"""The locust scenarios: their user classes, and keep-alive reuse past file descriptor 1024."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.bench.scenarios import SCENARIOS, loadtest_dir

LOADTEST = loadtest_dir()

EXPECTED_USERS = {
    "multiplex": {"AwaitUser", "ProbeUser"},
    "starvation": {"AwaitUser", "BlockUser", "ProbeUser"},
    "offload": {"AwaitUser", "OffloadUser", "ProbeUser"},
    "cpu": {"AwaitUser", "CpuInlineUser", "CpuThreadUser", "CpuProcessUser", "ProbeUser"},
    "story": {"AwaitUser", "BlockUser", "OffloadUser", "ProbeUser"},
    "realworld": {
        "AwaitUser",
        "ProbeUser",
        "DbSyncUser",
        "DbOffloadUser",
        "DbAsyncUser",
        "UpstreamRequestsUser",
        "UpstreamAiohttpUser",
        "JsonInlineUser",
        "JsonProcessUser",
    },
}

# Runs in a child process: importing locust monkey-patches the interpreter with gevent.
LIVENESS_PROBE = r"""
import json, select, socket, sys
from gevent import monkey
sys.path.insert(0, sys.argv[1])
import looplab_users as lu

real_poll = monkey.get_original("select", "poll")

def wait_readable(sock):
    poller = real_poll()
    poller.register(sock.fileno(), select.POLLIN)
    assert poller.poll(5000), "peer's data or FIN never arrived"

def pair(listener):
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server

lu.park_low_fds(1100)
listener = socket.create_server(("127.0.0.1", 0))
idle, idle_peer = pair(listener)
dirty, dirty_peer = pair(listener)
closed, closed_peer = pair(listener)
dirty_peer.sendall(b"x")
wait_readable(dirty)
closed_peer.close()
wait_readable(closed)
print(json.dumps({
    "fds": [idle.fileno(), dirty.fileno(), closed.fileno()],
    "installed": lu.LIVENESS_CHECK,
    "poll": [lu.socket_is_reusable(s) for s in (idle, dirty, closed)],
    "select": [lu._upstream_is_socket_alive(None, s) for s in (idle, dirty, closed)],
}))
"""


def bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "app", "bench", *args, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    result["_locust_log"] = (out / "locust.log").read_text()
    return result


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_runs_its_user_classes(scenario: str) -> None:
    """Each locustfile exposes exactly the user classes its scenario is made of."""
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOADTEST / f"{scenario}.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    listed = {line.strip() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert listed == EXPECTED_USERS[scenario]


def test_poll_check_keeps_idle_socket_past_fd_1024_where_select_fails() -> None:
    """poll() judges sockets above fd 1023 correctly; geventhttpclient's select() calls all dead."""
    proc = subprocess.run(
        [sys.executable, "-c", LIVENESS_PROBE, str(LOADTEST)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert min(seen["fds"]) >= 1024
    assert seen["installed"] == "poll"
    assert seen["poll"] == [True, False, False]  # idle: reuse; data pending or FIN: do not
    assert seen["select"] == [False, False, False]  # the trap: even the idle socket is "dead"


@pytest.mark.slow
def test_connections_are_reused_past_fd_1024(tmp_path: Path) -> None:
    """With every socket above fd 1100, each user still reuses one keep-alive connection."""
    users = 40
    result = bench(
        tmp_path,
        "multiplex",
        "--users",
        str(users),
        "--duration",
        "4",
        "--delay",
        "0.05",
        env={"LOOP_LAB_LOCUST_FD_FLOOR": "1100"},
    )
    assert "liveness check=poll, fd floor=1100" in result["_locust_log"]
    assert result["requests"] >= 5 * users
    assert result["server"]["accepted_connections"] <= users + 2
    assert result["failures"] == 0


@pytest.mark.slow
def test_select_check_reconnects_on_every_request_past_fd_1024(tmp_path: Path) -> None:
    """The unpatched select() check opens a new connection per request once fds pass 1023."""
    result = bench(
        tmp_path,
        "multiplex",
        "--users",
        "40",
        "--duration",
        "4",
        "--delay",
        "0.05",
        env={"LOOP_LAB_LOCUST_FD_FLOOR": "1100", "LOOP_LAB_LOCUST_LIVENESS": "select"},
    )
    assert "liveness check=select, fd floor=1100" in result["_locust_log"]
    assert result["server"]["accepted_connections"] >= 0.8 * result["requests"]
