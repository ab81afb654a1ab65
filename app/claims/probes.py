"""Instruments shared by the experiments: run on a named loop, count polls, tick, read RSS."""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import selectors
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from app.loops import LOOP_NAMES, LoopName, loop_factory, new_event_loop

T = TypeVar("T")

# The syscalls a loop thread sits in while it waits for I/O, by architecture: poll, select,
# epoll_wait, pselect6, ppoll, epoll_pwait, epoll_pwait2.
_POLL_SYSCALLS = {
    "x86_64": {"7", "23", "232", "270", "271", "281", "441"},
    "aarch64": {"22", "72", "73", "441"},
}.get(platform.machine(), set())


def run_on(name: LoopName, main: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Run `main()` to completion on a fresh loop of the named kind, giving up after `timeout`."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(bounded())


# which loops per_loop runs on: both, unless `loop-lab claims --loop` (one matrix cell) says one
_SELECTED: list[tuple[LoopName, ...]] = [LOOP_NAMES]


def only_loop(name: LoopName | None) -> None:
    """Run the per-loop experiments on `name` alone (None: on both loops again)."""
    _SELECTED[0] = LOOP_NAMES if name is None else (name,)


def per_loop(fn: Callable[[LoopName], T]) -> dict[LoopName, T]:
    """The same experiment on the default asyncio loop and on uvloop (or the one selected)."""
    return {name: fn(name) for name in _SELECTED[0]}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class _MarkingSelector(selectors.DefaultSelector):
    """The default selector, reporting each poll (and its timeout) as it returns."""

    def __init__(self, on_poll: Callable[[float | None], None]) -> None:
        super().__init__()
        self._on_poll = on_poll

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        self._on_poll(timeout)
        return ready


@contextmanager
def polled_loop(
    name: LoopName, on_poll: Callable[[float | None], None]
) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop that calls `on_poll` once per I/O poll, i.e. once per loop iteration.

    asyncio: the selector reports each select() as it returns (with the timeout it was given).
    uvloop: libuv's poll phase cannot be hooked, so an always-writable socket's writer callback
    marks it (libuv runs I/O callbacks inside the poll phase; its timeout is not visible).
    """
    if name == "asyncio":
        loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(_MarkingSelector(on_poll))
        try:
            yield loop
        finally:
            loop.close()
        return
    loop = new_event_loop(name)
    marker, peer = socket.socketpair()
    marker.setblocking(False)
    loop.add_writer(marker.fileno(), on_poll, None)
    try:
        yield loop
    finally:
        loop.remove_writer(marker.fileno())
        loop.close()
        marker.close()
        peer.close()


class Ticker:
    """A task that wakes every `interval` and notes when: gaps show how long the loop froze."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.ticks: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []

    async def _run(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def next_tick(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def window(self, start: float, end: float) -> tuple[int, float]:
        """Ticks inside (start, end), and the longest gap between ticks spanning that window."""
        inside = sum(1 for t in self.ticks if start < t < end)
        span = [t for t in self.ticks if t <= start][-1:] + [t for t in self.ticks if t > start]
        span = span[: next((i + 1 for i, t in enumerate(span) if t >= end), len(span))]
        gap = max((b - a for a, b in itertools.pairwise(span)), default=0.0)
        return inside, gap


def wait_until_polling(native_id: int, timeout: float = 2.0) -> bool:
    """Wait until the thread is asleep in a poll syscall; False if that cannot be seen in time.

    A condition wait on /proc, not a fixed sleep: the experiment needs the loop truly asleep.
    """
    deadline = time.monotonic() + timeout
    path = f"/proc/self/task/{native_id}"
    while time.monotonic() < deadline:
        try:
            with open(f"{path}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"{path}/syscall") as f:
                syscall = f.read().split()[0]
        except (OSError, IndexError):
            return False
        if state == "S" and syscall in _POLL_SYSCALLS:
            return True
        time.sleep(0.0005)
    return False


def epoll_fds() -> set[int]:
    """This process's epoll instances."""
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "anon_inode:[eventpoll]":
                found.add(int(entry))
        except OSError:
            continue
    return found


def epoll_watched(epfd: int) -> int:
    """How many file descriptors the epoll instance watches (its `tfd:` lines in fdinfo)."""
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        return sum(1 for line in f if line.startswith("tfd:"))


@contextmanager
def loop_in_thread(name: LoopName) -> Iterator[tuple[asyncio.AbstractEventLoop, int]]:
    """A fresh loop running forever in its own thread; yields it and the thread's native id."""
    loop = new_event_loop(name)
    started = threading.Event()
    native: list[int] = []

    def run() -> None:
        native.append(threading.get_native_id())
        loop.call_soon(started.set)
        loop.run_forever()

    thread = threading.Thread(target=run, name=f"claims-{name}-loop", daemon=True)
    thread.start()
    try:
        if not started.wait(5):
            raise TimeoutError(f"{name} loop thread did not start")
        yield loop, native[0]
    finally:

        async def shutdown() -> None:
            # Cancel what the experiment left behind so closing the loop destroys no pending task.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            asyncio.get_running_loop().stop()

        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
            thread.join(5)
        loop.close()
