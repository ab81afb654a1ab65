"""`/resolve`: n concurrent `loop.getaddrinfo` calls, and the fixed-size pool they queue on.

asyncio runs each getaddrinfo in the loop's default executor (`run_in_executor(None, ...)`), a
thread pool of fixed size shared with every other `run_in_executor(None, ...)` caller; uvloop runs
it in libuv's own thread pool (UV_THREADPOOL_SIZE, 4 by default). Either way calls past the pool's
size wait their turn, and so does anyone else who needs the same pool meanwhile.

loop-lab installs the default executor itself (`--default-executor-workers`), so `/stats` can
show its size and how busy it is.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter
from typing import Any, TypeVar

from aiohttp import web

from app.keys import DEFAULT_EXECUTOR, MONITOR, SETTINGS
from app.params import int_param
from app.responses import demo_response

routes = web.RouteTableDef()
T = TypeVar("T")

MAX_CALLS = 1000
HOST = "localhost"  # resolved from /etc/hosts: no DNS traffic leaves the machine
LIBUV_DEFAULT_THREADS = 4


class CountedExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting the jobs it holds so /stats can show them."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="looplab-default")
        self.workers = workers
        self.pending = 0  # submitted and not finished: running + waiting
        self._count_lock = threading.Lock()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._count_lock:
            self.pending += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any] | None) -> None:
        with self._count_lock:
            self.pending -= 1

    def as_dict(self) -> dict[str, int]:
        busy = min(self.pending, self.workers)
        return {"workers": self.workers, "busy": busy, "queued": self.pending - busy}


async def default_executor_ctx(app: web.Application) -> AsyncIterator[None]:
    executor = CountedExecutor(app[SETTINGS].default_executor_workers)
    # the loop shuts its default executor down itself when it closes (asyncio.Runner, run_app)
    asyncio.get_running_loop().set_default_executor(executor)
    app[DEFAULT_EXECUTOR] = executor
    yield


def libuv_threads() -> int:
    """The size of libuv's thread pool, as libuv reads it from the environment (1..1024)."""
    try:
        return max(1, min(1024, int(os.environ.get("UV_THREADPOOL_SIZE", ""))))
    except ValueError:
        return LIBUV_DEFAULT_THREADS


async def _timed_lookup(loop: asyncio.AbstractEventLoop) -> float:
    started = perf_counter()
    await loop.getaddrinfo(HOST, 80, type=socket.SOCK_STREAM)
    return perf_counter() - started


@routes.get("/resolve")
async def resolve_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    n = int_param(request, "n", default=50, lo=1, hi=MAX_CALLS)
    loop = asyncio.get_running_loop()
    solo = await _timed_lookup(loop)  # one call alone: what a call costs without a queue
    lookups = [asyncio.ensure_future(_timed_lookup(loop)) for _ in range(n)]
    await asyncio.sleep(0)  # one loop turn: every lookup starts and joins the pool's queue
    # another user of the default executor, arriving just behind the lookups
    submitted = perf_counter()
    bystander_started = await loop.run_in_executor(None, perf_counter)
    bystander_wait = bystander_started - submitted
    seconds = await asyncio.gather(*lookups)
    queued = [max(0.0, s - solo) for s in seconds]
    if request.app[MONITOR].loop == "uvloop":
        runs_in = f"libuv's thread pool ({libuv_threads()} threads, UV_THREADPOOL_SIZE)"
    else:
        workers = request.app[DEFAULT_EXECUTOR].workers
        runs_in = f"the loop's default executor ({workers} threads, --default-executor-workers)"
    return demo_response(
        request,
        "resolve",
        started,
        n=n,
        host=HOST,
        runs_in=runs_in,
        solo_ms=round(solo * 1000, 3),
        call_ms={
            "min": round(min(seconds) * 1000, 3),
            "max": round(max(seconds) * 1000, 3),
        },
        # each call's time beyond one uncontended call: its wait for a free thread
        queued_ms=[round(q * 1000, 3) for q in queued],
        bystander_wait_ms=round(bystander_wait * 1000, 3),
    )
