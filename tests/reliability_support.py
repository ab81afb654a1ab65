"""Helpers for the reliability tests: a real `python -m app serve` process, raw HTTP on sockets.

Raw asyncio sockets keep thousands of clients cheap and let a test do what real clients do and
client libraries hide: stop halfway through a request line, hang up mid-request, read only a
status line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving on http://127\.0\.0\.1:(\d+)")


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (thousands of test sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def request_bytes(path: str, *, method: str = "GET", keep_alive: bool = False) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: {connection}\r\n\r\n".encode()
    )


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def http_get(
    port: int, path: str, *, within: float = 30.0, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (Connection: close); status, headers, body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    try:
        writer.write(request_bytes(path))
        raw = await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
    return parse_response(raw)


async def get_json(port: int, path: str) -> Any:
    status, _, body = await http_get(port, path)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)


async def wait_until(
    predicate: Callable[[], Any], *, within: float, interval: float = 0.02, what: str = ""
) -> float:
    """Poll an async or sync predicate until true; return the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return loop.time() - started
        if loop.time() - started > within:
            raise TimeoutError(f"not true within {within}s: {what}")
        await asyncio.sleep(interval)


class ServeProcess:
    """`python -m app serve --port 0 ...` in a subprocess, its stderr log collected line by line."""

    def __init__(self, *args: str, nofile: int | None = None) -> None:
        self.args = args
        self.nofile = nofile
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.port = 0
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _limit_fds(self) -> None:  # runs in the child before exec
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    async def start(self) -> ServeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "serve",
            "--port",
            "0",
            *self.args,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self._limit_fds if self.nofile is not None else None,
        )
        self._reader = asyncio.create_task(self._read_log())
        line = await self.wait_for_line(SERVING, within=60)
        match = SERVING.search(line)
        assert match is not None
        self.port = int(match.group(1))
        return self

    async def _read_log(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, pattern: re.Pattern[str] | str, *, within: float) -> str:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        async with asyncio.timeout(within):
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"server exited; log:\n{self.log}")
                self._changed.clear()
                await self._changed.wait()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), within)
        if self._reader is not None:
            await self._reader
        return code

    async def close(self) -> None:
        """Stop the server if it still runs (SIGTERM, then SIGKILL); never leave it behind."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
