"""Thread and process pools for `/offload`, `/cpu` and `/threadsafe`: bounded, counted, stoppable.

Bounded: `run_in_executor` queues without limit, so a flood of `/offload` would pile up futures,
handlers and connections until memory or patience ran out. Each pool admits `workers + queue` jobs
at most; the next one gets `PoolFull`, an HTTP 503 with `Retry-After`, so every endpoint that uses
a pool answers the excess cleanly without handling it itself.

Counted by the job, not by the waiting handler: a client that hangs up cancels its handler, but a
job already running in a worker keeps that worker busy until it returns. So a job leaves the count
when its concurrent future finishes (in the worker thread, hence the lock), and a queued job whose
handler is cancelled is cancelled too and never runs.

`run` is `loop.run_in_executor` spelled out (`executor.submit` + `asyncio.wrap_future`), so the
job's own future is at hand to count.

Stoppable: jobs that wait (`worker_sleep`) wake up when the pool shuts down, so a drained server
exits at the end of its grace period instead of when the last sleeping worker would have woken.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, Literal, TypeVar

from aiohttp import web

PoolName = Literal["thread", "process"]
POOL_NAMES: tuple[PoolName, ...] = ("thread", "process")
Via = Literal["inline", "thread", "process"]
VIA: tuple[Via, ...] = ("inline", *POOL_NAMES)  # where a handler's `via` runs its work
T = TypeVar("T")

RETRY_AFTER_MAX_S = 60
_JOB_TIME_WEIGHT = 0.2  # moving average of job durations: recent jobs count most

# Each pool worker (thread or process) learns its pool's stop event from the pool's initializer.
_worker = threading.local()


def _bind_stop_event(stop: threading.Event | ProcessEvent) -> None:
    _worker.stop = stop


def worker_sleep(delay: float) -> bool:
    """Block this worker for `delay` seconds, or until its pool shuts down; True if it slept fully.

    Still a blocking call (the worker can do nothing else meanwhile), just one shutdown can end.
    """
    stop: threading.Event | ProcessEvent | None = getattr(_worker, "stop", None)
    if stop is None:  # called outside a pool
        time.sleep(delay)
        return True
    return not stop.wait(delay)


def _timed_call(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """Run in the worker (picklable for processes): the result and the job's own run time."""
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


class PoolFull(web.HTTPServiceUnavailable):
    """503 for a job that finds its pool's workers busy and its queue full."""

    def __init__(self, pool: str, workers: int, queue: int, retry_after: int) -> None:
        body = {
            "error": f"the {pool} pool is saturated: {workers} workers busy, {queue} jobs queued",
            "param": "pool",
            "allowed": f"at most {workers + queue} jobs at once (--{pool}-workers, --pool-queue)",
            "retry_after_s": retry_after,
        }
        super().__init__(
            text=json.dumps(body),
            content_type="application/json",
            headers={"Retry-After": str(retry_after)},
        )


class TrackedPool:
    def __init__(self, name: PoolName, executor: Executor, workers: int, queue_limit: int) -> None:
        self.name = name
        self.executor = executor
        self.workers = workers
        self.queue_limit = queue_limit
        self.pending = 0  # admitted and not finished: running + waiting
        self.completed = 0
        self.rejected = 0
        self.peak_queued = 0
        self.job_seconds = 0.0  # moving average of finished jobs' run time (queue wait excluded)
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        return min(self.pending, self.workers)

    @property
    def queued(self) -> int:
        return max(0, self.pending - self.workers)

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_limit

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: queued jobs * average job time / workers."""
        estimate = self.job_seconds * (self.queued + 1) / self.workers
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(estimate)))

    def _finished(self, future: Future[tuple[Any, float]]) -> None:
        # runs in the thread that finished the job, or on the loop when a queued job is cancelled
        elapsed = None
        if not future.cancelled() and future.exception() is None:
            elapsed = future.result()[1]
        with self._lock:
            self.pending -= 1
            self.completed += 1
            if elapsed is not None:
                self.job_seconds += _JOB_TIME_WEIGHT * (elapsed - self.job_seconds)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in the pool; raise PoolFull (a 503) rather than queue past the bound."""
        with self._lock:
            if self.pending >= self.capacity:
                self.rejected += 1
                raise PoolFull(self.name, self.workers, self.queue_limit, self.retry_after())
            self.pending += 1
            self.peak_queued = max(self.peak_queued, self.pending - self.workers)
        try:
            future: Future[tuple[T, float]] = self.executor.submit(_timed_call, fn, *args)
        except BaseException:
            with self._lock:
                self.pending -= 1
            raise
        future.add_done_callback(self._finished)
        # a cancelled await cancels the job too if it has not started yet
        value, _elapsed = await asyncio.wrap_future(future)
        return value

    def as_dict(self) -> dict[str, int]:
        return {"workers": self.workers, "busy": self.busy, "queued": self.queued}

    def limits_dict(self) -> dict[str, int]:
        return {
            "queue_limit": self.queue_limit,
            "peak_queued": self.peak_queued,
            "rejected": self.rejected,
        }

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class Executors:
    def __init__(self, thread_workers: int, process_workers: int, queue_limit: int = 256) -> None:
        self._thread_stop = threading.Event()
        self.thread = TrackedPool(
            "thread",
            ThreadPoolExecutor(
                max_workers=thread_workers,
                thread_name_prefix="looplab-offload",
                initializer=_bind_stop_event,
                initargs=(self._thread_stop,),
            ),
            thread_workers,
            queue_limit,
        )
        # forkserver: forking a process that already runs threads (watchdog, pools) is unsafe
        context = multiprocessing.get_context("forkserver")
        self._process_stop = context.Event()
        self.process = TrackedPool(
            "process",
            ProcessPoolExecutor(
                max_workers=process_workers,
                mp_context=context,
                initializer=_bind_stop_event,
                initargs=(self._process_stop,),
            ),
            process_workers,
            queue_limit,
        )

    def pool(self, name: PoolName) -> TrackedPool:
        return self.thread if name == "thread" else self.process

    async def run_via(self, via: Via, fn: Callable[[int], T], arg: int) -> T:
        """`fn(arg)` where `via` says: on the loop itself (inline) or in the thread/process pool."""
        if via == "inline":
            return fn(arg)  # holds the loop until it returns: the lesson of the inline form
        return await self.pool(via).run(fn, arg)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"thread": self.thread.as_dict(), "process": self.process.as_dict()}

    def limits_dict(self) -> dict[str, dict[str, int]]:
        """The queue bound and what it did: deepest queue seen, jobs turned away with 503."""
        return {"thread": self.thread.limits_dict(), "process": self.process.limits_dict()}

    def shutdown(self) -> None:
        """Wake every waiting job, drop queued ones, and join the workers."""
        self._thread_stop.set()
        self._process_stop.set()
        self.thread.shutdown()
        self.process.shutdown()
