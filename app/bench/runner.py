"""The processes a bench run starts: the server under test and locust, each with its own log.

Both inherit this process's RLIMIT_NOFILE, which the bench lifts to the hard limit first
(app.monitor.process.raise_nofile_limit): locust would raise its soft limit only to 10,000, too
few for 10,000 sockets plus its own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.launch import ProcessError, ServerProcess, eventually, free_port
from app.loops import LoopName
from app.monitor.process import cpu_seconds, rss_bytes

SERVE_BACKLOG = 4096
# lines locust logs when a process ran above its CPU threshold (master, workers, or at the end)
CPU_WARNING_PATTERNS = (
    "CPU usage above",
    "exceeded cpu threshold",
    "CPU usage threshold was exceeded",
    "CPU usage was too high",
)
# one locust process saturates near 2.5-3k requests/s on this kind of box; users are cheap, but
# give every ~5,000 users their own process so greenlets and sockets spread over the cores
USERS_PER_PROCESS = 5000


def auto_processes(users: int) -> int:
    """How many locust worker processes to use (1 = a single plain process, no master)."""
    if users <= 2000:
        return 1
    return max(2, min(os.cpu_count() or 2, math.ceil(users / USERS_PER_PROCESS)))


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> int:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


async def _terminate_tree(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Stop locust and the worker processes it forked (they outlive a master that is gone)."""
    children = [pid for pid in process_tree(proc.pid) if pid != proc.pid]
    await _terminate(proc, grace)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await eventually(
            lambda: not any(_alive(pid) for pid in children), within=grace, interval=0.1
        )
    for pid in children:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Still running (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def _copy_lines(stream: asyncio.StreamReader, sink: IO[bytes]) -> None:
    """Copy a child's output to its log file as it comes."""
    while line := await stream.readline():
        sink.write(line)
        sink.flush()


def lab_server(
    loop: LoopName,
    log_path: Path,
    *,
    max_delay: float = 60.0,
    thread_workers: int = 8,
    workers: int = 1,
    max_connections: int = 0,
) -> ServerProcess:
    """`python -m app serve` on a port of its own choosing, with the chosen loop.

    `workers` > 1: that many processes share the port (SO_REUSEPORT); `max_connections` is each
    one's limit (0: the server derives it from its fd limit).
    """
    return ServerProcess(
        "--workers",
        str(workers),
        "--max-connections",
        str(max_connections),
        "--loop",
        loop,
        "--backlog",
        str(SERVE_BACKLOG),
        "--max-delay",
        f"{max_delay:g}",
        "--thread-workers",
        str(thread_workers),
        "--grace",
        "5",
        log_path=log_path,
    )


@dataclass(frozen=True)
class LocustCommand:
    locustfile: Path
    target: str
    users: int
    spawn_rate: float
    duration_s: int
    out_dir: Path
    processes: int
    scenario_args: Sequence[str] = ()

    def argv(self, master_port: int | None = None) -> list[str]:
        out = self.out_dir
        argv = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(self.locustfile),
            "--headless",
            "--host",
            self.target,
            "--users",
            str(self.users),
            "--spawn-rate",
            f"{self.spawn_rate:g}",
            "--run-time",
            f"{self.duration_s}s",
            "--csv",
            str(out / "locust"),
            "--csv-full-history",
            "--html",
            str(out / "locust.html"),
            "--json-file",
            str(out / "locust"),
            "--only-summary",
            "--exit-code-on-error",
            "0",  # failures are judged by the bench (--max-failures), not by locust's exit code
        ]
        if self.processes > 1:
            assert master_port is not None
            argv += [
                "--processes",
                str(self.processes),
                "--master-bind-host",
                "127.0.0.1",
                "--master-bind-port",
                str(master_port),
                "--master-port",
                str(master_port),
            ]
        return [*argv, *self.scenario_args]


@dataclass(frozen=True)
class LocustOutcome:
    exit_code: int
    cpu_warning: bool
    cpu_warning_lines: tuple[str, ...]
    wall_s: float
    cpu_s: float  # user + system CPU of every locust process (master and forked workers)
    rss_mb_peak: float = 0.0  # the sum of each locust process's highest sampled RSS
    pids: int = 1  # locust processes seen (master and workers)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc/<pid>/task/<tid>/children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{current}/task/{task}/children") as f,
                ):
                    todo.extend(int(child) for child in f.read().split())
    return tree


class TreeCpu:
    """CPU time and RSS of a process and its children, from samples (a child's last one counts)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._seen: dict[int, float] = {}
        self._rss: dict[int, int] = {}

    def sample(self) -> None:
        for pid in process_tree(self.pid):
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._seen[pid] = max(cpu, self._seen.get(pid, 0.0))
            with contextlib.suppress(OSError):
                self._rss[pid] = max(rss_bytes(pid), self._rss.get(pid, 0))

    @property
    def total_s(self) -> float:
        return sum(self._seen.values())

    @property
    def rss_mb_peak(self) -> float:
        return sum(self._rss.values()) / 2**20

    @property
    def pids(self) -> int:
        return len(self._seen)

    async def follow(self, interval: float = 1.0) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)


def cpu_warnings(log_text: str) -> tuple[str, ...]:
    """The lines in which locust said it ran out of CPU (so it, not the server, set the pace)."""
    return tuple(
        line.strip()
        for line in log_text.splitlines()
        if any(pattern in line for pattern in CPU_WARNING_PATTERNS)
    )


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")


def _read_log(path: Path) -> str:
    return path.read_text(errors="replace")


async def run_locust(
    command: LocustCommand, env: dict[str, str], log_path: Path, limit_s: float
) -> LocustOutcome:
    """Run locust headless to completion (it stops itself after --run-time)."""
    master_port = free_port() if command.processes > 1 else None
    started = time.monotonic()
    with _open_log(log_path) as log:
        proc = await asyncio.create_subprocess_exec(
            *command.argv(master_port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        assert proc.stdout is not None
        copier = asyncio.create_task(_copy_lines(proc.stdout, log))
        cpu = TreeCpu(proc.pid)  # sampled each second: the last second of each process is missed
        follower = asyncio.create_task(cpu.follow())
        try:
            code = await asyncio.wait_for(proc.wait(), limit_s)
        except TimeoutError:
            await _terminate_tree(proc, grace=10.0)
            raise ProcessError(f"locust ran past {limit_s:.0f} s; see {log_path}") from None
        except BaseException:  # cancelled (Ctrl-C): do not leave locust running
            await _terminate_tree(proc, grace=10.0)
            raise
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await copier
    warnings = cpu_warnings(_read_log(log_path))
    wall = time.monotonic() - started
    return LocustOutcome(
        code, bool(warnings), warnings, wall, cpu.total_s, cpu.rss_mb_peak, cpu.pids
    )
