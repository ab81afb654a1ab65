"""Starting a server for a test, a bench run or a script, and waiting until it serves.

One way to do each: `ServerThread` runs loop-lab in this process on its own thread and loop;
`ServerProcess` runs any server in a subprocess and is ready once it logs the line `SERVING`
matches (loop-lab's "serving on URL", the bare reference server's "listening on URL");
`eventually()` polls what cannot be awaited; `raise_nofile_limit` (app.monitor.process) and
`free_port` are here for all who start servers and clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO

from app.config import Settings
from app.loops import LoopName, loop_factory
from app.server import RunningServer, start_server

# the line a server logs once it accepts connections: loop-lab's and the bare reference server's
SERVING = re.compile(r"(?:serving|listening) on (http://[^\s,]+)")
ROOT = Path(__file__).resolve().parent.parent  # children run here: `app` imports from it
STOP_GRACE_S = 30.0  # SIGTERM drains; past this the process is killed


class ProcessError(RuntimeError):
    """A child process failed to start, to get ready, or to exit in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a process that cannot be told to pick its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(
    predicate: Callable[[], object | Awaitable[object]],
    *,
    within: float,
    what: str = "",
    interval: float = 0.02,
) -> float:
    """Poll a sync or async predicate until it is true; the seconds that took.

    For state that cannot be awaited (another thread's counters, another process): a poll every
    `interval`, so the wait ends as soon as the state is there, never after a fixed sleep.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return loop.time() - started
        if loop.time() - started > within:
            raise TimeoutError(f"not true within {within:g}s: {what}")
        await asyncio.sleep(interval)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without LOOP_LAB_* (a stray LOOP_LAB_DEBUG would change what runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOP_LAB_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def serve_command(*args: str) -> list[str]:
    """`python -m app serve` on 127.0.0.1, a port of its own choosing, and `args`."""
    return [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0", *args]


class ServerProcess:
    """A server in a subprocess; its output kept line by line (and copied to `log_path`)."""

    def __init__(
        self,
        *serve_args: str,
        command: Sequence[str] | None = None,
        log_path: Path | None = None,
        nofile: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = list(command) if command is not None else serve_command(*serve_args)
        self.log_path = log_path
        self.nofile = nofile
        self.env = child_env(env)
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.url = ""
        self.port = 0
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def _limit_fds(self) -> None:  # runs in the child before exec
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    async def start(self, within: float = 60.0) -> ServerProcess:
        """Start it; return once it has logged the URL it serves on."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=self._limit_fds if self.nofile is not None else None,
        )
        self._reader = asyncio.create_task(self._read_output())
        try:
            match = SERVING.search(await self.wait_for_line(SERVING, within=within))
        except BaseException:
            await self.stop()
            raise
        assert match is not None
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _open_log(self) -> IO[bytes] | None:
        return None if self.log_path is None else open(self.log_path, "wb")

    async def _read_output(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        log = self._open_log()
        try:
            async for raw in self.proc.stdout:
                if log is not None:
                    log.write(raw)
                    log.flush()
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.set()
        finally:
            if log is not None:
                log.close()
            self._changed.set()

    async def wait_for_line(self, pattern: re.Pattern[str] | str, *, within: float) -> str:
        """The first line of its output (so far or to come) that `pattern` matches."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        try:
            async with asyncio.timeout(within):
                while True:
                    for line in self.lines[seen:]:
                        if regex.search(line):
                            return line
                    seen = len(self.lines)
                    if self._reader is not None and self._reader.done():
                        raise ProcessError(f"the server exited; its output:\n{self.tail()}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise ProcessError(
                f"no line matching {regex.pattern!r} within {within:g}s:\n{self.tail()}"
            ) from None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.lines[-lines:]) or "(no output)"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), within)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (a server drains and exits), SIGKILL past `grace`; its exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return self.proc.returncode


class ServerThread:
    """loop-lab on a real socket (port 0), on a chosen loop, in its own thread of this process.

    Its own thread and loop keep the caller's loop independent: when a handler blocks the
    server's loop, a client on the caller's loop can still time what it sees.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: RunningServer | None = None
        self._thread = threading.Thread(target=self._run, name="looplab-server", daemon=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=loop_factory(self.settings.loop)) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = await start_server(self.settings)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def start(self, within: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=within):
            raise TimeoutError(f"server thread did not become ready in {within:g} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "server thread did not stop"


@contextlib.contextmanager
def running_server(loop: LoopName = "asyncio", **overrides: object) -> Iterator[ServerThread]:
    """Serve on 127.0.0.1:0 with the given loop and setting overrides until the block exits."""
    settings = replace(Settings(loop=loop, port=0, grace=5.0, stall_threshold=0.2), **overrides)  # type: ignore[arg-type]
    thread = ServerThread(settings)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
