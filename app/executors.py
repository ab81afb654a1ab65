"""Thread and process pools for `/offload` and `/cpu`, with busy/queued counts taken on the loop.

Counts are kept on the loop thread (submit and done-callback both run there), so they need no lock
and cost nothing in the workers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Literal, TypeVar

PoolName = Literal["thread", "process"]
POOL_NAMES: tuple[PoolName, ...] = ("thread", "process")
T = TypeVar("T")


class TrackedPool:
    def __init__(self, name: PoolName, executor: Executor, workers: int) -> None:
        self.name = name
        self.executor = executor
        self.workers = workers
        self.pending = 0  # submitted and not finished: running + waiting
        self.completed = 0

    @property
    def busy(self) -> int:
        return min(self.pending, self.workers)

    @property
    def queued(self) -> int:
        return max(0, self.pending - self.workers)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        self.pending += 1
        try:
            return await loop.run_in_executor(self.executor, fn, *args)
        finally:
            self.pending -= 1
            self.completed += 1

    def as_dict(self) -> dict[str, int]:
        return {"workers": self.workers, "busy": self.busy, "queued": self.queued}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class Executors:
    def __init__(self, thread_workers: int, process_workers: int) -> None:
        self.thread = TrackedPool(
            "thread",
            ThreadPoolExecutor(max_workers=thread_workers, thread_name_prefix="looplab-offload"),
            thread_workers,
        )
        # forkserver: forking a process that already runs threads (watchdog, pools) is unsafe
        context = multiprocessing.get_context("forkserver")
        self.process = TrackedPool(
            "process",
            ProcessPoolExecutor(max_workers=process_workers, mp_context=context),
            process_workers,
        )

    def pool(self, name: PoolName) -> TrackedPool:
        return self.thread if name == "thread" else self.process

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"thread": self.thread.as_dict(), "process": self.process.as_dict()}

    def shutdown(self) -> None:
        self.thread.shutdown()
        self.process.shutdown()
