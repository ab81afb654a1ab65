"""The processes a bench run starts: the server under test and locust, each with its own log.

Both inherit this process's RLIMIT_NOFILE, which `raise_nofile_limit` lifts to the hard limit first:
locust would raise its soft limit only to 10,000, too few for 10,000 sockets plus its own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

from app.loops import LoopName

SERVE_BACKLOG = 4096
_SERVING = re.compile(r"serving on (http://\S+)")
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


class ProcessError(RuntimeError):
    """A child process failed to start, to get ready, or to exit in time."""


def raise_nofile_limit() -> int:
    """Lift RLIMIT_NOFILE's soft limit to the hard limit; children inherit it. Returns the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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


async def _copy_lines(
    stream: asyncio.StreamReader, sink: IO[bytes], found: asyncio.Future[str] | None = None
) -> None:
    """Copy a child's output to its log file; resolve `found` with the URL it announces."""
    while line := await stream.readline():
        sink.write(line)
        sink.flush()
        if found is not None and not found.done():
            match = _SERVING.search(line.decode(errors="replace"))
            if match:
                found.set_result(match.group(1))
    if found is not None and not found.done():
        found.set_exception(ProcessError("the server exited before it started serving"))


async def wait_healthy(url: str, deadline: float) -> None:
    """Poll GET /healthz until it answers 200 or the monotonic `deadline` passes."""
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ProcessError(f"{url}/healthz did not answer 200 in time")
            await asyncio.sleep(0.1)


@dataclass
class ServerProcess:
    """`python -m app serve` on a free port with the chosen loop, logging to `log_path`."""

    loop: LoopName
    log_path: Path
    max_delay: float = 60.0
    thread_workers: int = 8
    proc: asyncio.subprocess.Process | None = None
    url: str = ""
    _log: IO[bytes] | None = None
    _copier: asyncio.Task[None] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--loop",
            self.loop,
            "--host",
            "127.0.0.1",
            "--port",
            "0",  # the server picks a free port and logs it: no race with other servers here
            "--backlog",
            str(SERVE_BACKLOG),
            "--max-delay",
            f"{self.max_delay:g}",
            "--thread-workers",
            str(self.thread_workers),
            "--grace",
            "5",
        ]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self, ready_within: float = 60.0) -> str:
        deadline = time.monotonic() + ready_within
        self._log = _open_log(self.log_path)
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        announced: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._copier = asyncio.create_task(_copy_lines(self.proc.stdout, self._log, announced))
        try:
            self.url = await asyncio.wait_for(announced, ready_within)
            await wait_healthy(self.url, deadline)
        except (ProcessError, TimeoutError) as exc:
            await self.stop()
            raise ProcessError(f"server did not get ready ({exc}); see {self.log_path}") from exc
        return self.url

    async def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            code = await _terminate(self.proc, grace=20.0)
        if self._copier is not None:
            await self._copier
        if self._log is not None:
            self._log.close()
        return code


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


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a local process (Linux /proc), None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    """CPU time of a process and its children, summed from samples (a child's last one counts)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._seen: dict[int, float] = {}

    def sample(self) -> None:
        for pid in process_tree(self.pid):
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._seen[pid] = max(cpu, self._seen.get(pid, 0.0))

    @property
    def total_s(self) -> float:
        return sum(self._seen.values())

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
            await _terminate(proc, grace=10.0)
            raise ProcessError(f"locust ran past {limit_s:.0f} s; see {log_path}") from None
        except BaseException:  # cancelled (Ctrl-C): do not leave locust running
            await _terminate(proc, grace=10.0)
            raise
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await copier
    warnings = cpu_warnings(_read_log(log_path))
    wall = time.monotonic() - started
    return LocustOutcome(code, bool(warnings), warnings, wall, cpu.total_s)
