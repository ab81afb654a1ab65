"""Claims about scale: thousands of tasks vs threads, and 10,000 concurrent connections."""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import cast

from app.claims.probes import Ticker, loop_in_thread, ms, per_loop, run_on
from app.claims.registry import Outcome, claim, verdict_of
from app.loops import LoopName
from app.monitor.process import raise_nofile_limit, rss_bytes

WAITERS = 2000
CONNECTIONS = 10_000
IO_WAIT = 0.05


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def _task_memory(name: LoopName, traced: bool) -> int:
    """Bytes (RSS, or traced Python heap) added by WAITERS tasks all waiting on one event."""

    async def main() -> int:
        gate = asyncio.Event()
        started = 0
        all_started = asyncio.Event()

        async def waiter() -> None:
            nonlocal started
            started += 1
            if started == WAITERS:
                all_started.set()
            await gate.wait()

        gc.collect()
        base = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
        tasks = [asyncio.create_task(waiter()) for _ in range(WAITERS)]
        await all_started.wait()
        now = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
        gate.set()
        await asyncio.gather(*tasks)
        return now - base

    if not traced:
        return run_on(name, main)
    tracemalloc.start()
    try:
        return run_on(name, main)
    finally:
        tracemalloc.stop()


def _thread_memory() -> int:
    """RSS added by WAITERS threads all waiting on one event (their stacks are not traced)."""
    gate = threading.Event()
    lock = threading.Lock()
    started = 0
    all_started = threading.Event()

    def waiter() -> None:
        nonlocal started
        with lock:
            started += 1
            if started == WAITERS:
                all_started.set()
        gate.wait(30)

    gc.collect()
    base = rss_bytes()
    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(WAITERS)]
    try:
        for thread in threads:
            thread.start()
        all_started.wait(30)
        return rss_bytes() - base
    finally:
        gate.set()
        for thread in threads:
            thread.join(5)


def _tasks_time(name: LoopName) -> float:
    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(asyncio.sleep(IO_WAIT) for _ in range(WAITERS)))
        return time.perf_counter() - start

    return run_on(name, main)


def _threads_time() -> float:
    start = time.perf_counter()
    threads = [threading.Thread(target=time.sleep, args=(IO_WAIT,)) for _ in range(WAITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return time.perf_counter() - start


def _stack_reserve() -> str:
    size = threading.stack_size() or resource.getrlimit(resource.RLIMIT_STACK)[0]
    return "an unlimited-size" if size == resource.RLIM_INFINITY else f"{size >> 20} MiB"


@claim(
    "tasks_cheaper_than_threads",
    claim="For I/O-bound waits, thousands of tasks are faster and use less memory than threads.",
    quote="For I/O-bound tasks, asyncio is faster and cheaper (thousands of async tasks use less "
    "memory than thousands of threads).",
    timeout=30.0,
)
def tasks_cheaper_than_threads() -> Outcome:
    task_rss = per_loop(lambda name: _task_memory(name, traced=False))
    task_heap = per_loop(lambda name: _task_memory(name, traced=True))
    task_time = per_loop(_tasks_time)
    thread_rss = _thread_memory()
    thread_time = _threads_time()
    checks: dict[str, bool] = {}
    parts = []
    for name in task_rss:
        per_task = max(task_rss[name], task_heap[name]) / WAITERS
        checks[f"{name} tasks use less memory"] = per_task < thread_rss / WAITERS
        checks[f"{name} tasks finish sooner"] = task_time[name] < thread_time
        parts.append(
            f"{name} tasks: {_kib(task_heap[name] / WAITERS)} each of Python heap "
            f"(RSS +{_kib(task_rss[name] / WAITERS)} each), {ms(task_time[name])} for all"
        )
    parts.append(
        f"threads: RSS +{_kib(thread_rss / WAITERS)} each (plus {_stack_reserve()} of address "
        f"space reserved for each stack, and kernel memory RSS does not show), "
        f"{ms(thread_time)} for all"
    )
    return Outcome(
        verdict_of(checks),
        f"{WAITERS} concurrent waits ({ms(IO_WAIT)} each for the timing): " + "; ".join(parts),
        {
            "task_bytes": {n: max(task_rss[n], task_heap[n]) / WAITERS for n in task_rss},
            "thread_bytes": thread_rss / WAITERS,
            "task_s": task_time,
            "thread_s": thread_time,
        },
    )


# The clients live in another process so the server's fd budget covers all 10,000 connections.
_CLIENT = r"""
import json, socket, sys, time
from app.monitor.process import raise_nofile_limit
port, n = int(sys.argv[1]), int(sys.argv[2])
raise_nofile_limit()
socks = []
try:
    t0 = time.monotonic()
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    t1 = time.monotonic()
    for s in socks:
        s.sendall(b"ping\n")
    ok = sum(1 for s in socks if s.recv(16) == b"pong\n")
    t2 = time.monotonic()
finally:
    for s in socks:
        s.close()
print(json.dumps({"ok": ok, "connect_s": t1 - t0, "exchange_s": t2 - t1}))
"""


class _Counter:
    """Server-side bookkeeping, touched only on the loop's thread."""

    def __init__(self) -> None:
        self.open = self.peak = self.served = 0
        self.threads: set[int] = set()
        self.transports: set[asyncio.Transport] = set()
        self.all_closed = asyncio.Event()


class _Pong(asyncio.Protocol):
    def __init__(self, counter: _Counter) -> None:
        self.counter = counter
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        c = self.counter
        c.transports.add(self.transport)
        c.open += 1
        c.peak = max(c.peak, c.open)

    def data_received(self, data: bytes) -> None:
        self.counter.served += 1
        self.counter.threads.add(threading.get_ident())
        if self.transport is not None:
            self.transport.write(b"pong\n")

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.counter
        if self.transport is not None:
            c.transports.discard(self.transport)
        c.open -= 1
        if c.open == 0:
            c.all_closed.set()


def _fd_budget(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; return how many fit."""
    return min(wanted, raise_nofile_limit() - 256)


def _hold_connections(name: LoopName, n: int) -> dict[str, float]:
    with (
        loop_in_thread(name) as (loop, _),
        # Bound here so the port is known at once; the server takes it over (closing it is then
        # a no-op), and the with-block closes it if the server never did.
        socket.create_server(("127.0.0.1", 0), backlog=4096) as listener,
    ):
        port = listener.getsockname()[1]
        counter_box: list[_Counter] = []
        ticker = Ticker(0.01)

        async def start() -> asyncio.AbstractServer:
            counter_box.append(_Counter())
            ticker.start()
            return await loop.create_server(
                lambda: _Pong(counter_box[0]), sock=listener, backlog=4096
            )

        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=5)
        begin = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _CLIENT, str(port), str(n)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        end = time.monotonic()
        client = json.loads(done.stdout)

        async def finish() -> tuple[int, float]:
            counter = counter_box[0]
            server.close()
            await server.wait_closed()
            try:
                await asyncio.wait_for(counter.all_closed.wait(), 5)
            except TimeoutError:
                for transport in list(counter.transports):
                    transport.abort()
                await asyncio.wait_for(counter.all_closed.wait(), 5)
            await ticker.next_tick()
            await ticker.stop()
            return len(counter.threads), ticker.window(begin, end)[1]

        threads, stall = asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout=15)
        counter = counter_box[0]
        return {
            "answered": client["ok"],
            "peak_open": counter.peak,
            "served": counter.served,
            "server_threads": threads,
            "connect_s": client["connect_s"],
            "exchange_s": client["exchange_s"],
            "longest_stall_s": stall,
        }


@claim(
    "ten_thousand_connections",
    claim="One event loop can serve 10,000 concurrent connections, multiplexed by the selector.",
    quote="an event loop with 10,000 concurrent connections can handle all of them efficiently "
    "because the selector multiplexes I/O.",
    timeout=60.0,
)
def ten_thousand_connections() -> Outcome:
    n = _fd_budget(CONNECTIONS)
    runs = per_loop(lambda name: _hold_connections(name, n))
    checks: dict[str, bool] = {}
    for name, r in runs.items():
        checks[f"{name} all answered"] = r["answered"] == n and r["served"] == n
        checks[f"{name} all open at once"] = r["peak_open"] == n
        checks[f"{name} one thread"] = r["server_threads"] == 1
    scale = "" if n == CONNECTIONS else f" (scaled down: the fd limit allows {n})"
    parts = [
        f"{name}: {r['answered']:.0f}/{n} answered, peak {r['peak_open']:.0f} open at once, "
        f"served on {r['server_threads']:.0f} thread; connect all {ms(r['connect_s'])}, one "
        f"request on each {ms(r['exchange_s'])}; the server loop's longest stall "
        f"{ms(r['longest_stall_s'])}"
        for name, r in runs.items()
    ]
    return Outcome(
        verdict_of(checks),
        f"{n} loopback client sockets from a separate process, held open together{scale}: "
        + "; ".join(parts),
        {"runs": runs, "n": n},
    )
