"""Per-request step profiler: the longest stretch a handler ran without yielding to the loop.

A coroutine runs on the loop in "steps": each `send()` into it runs synchronously until its next
`await` that really suspends. `stepped()` drives the handler coroutine itself, timing every step, so
a handler that calls `time.sleep(0.2)` shows one 200 ms step while one that awaits shows only
microsecond steps. It works the same on asyncio and uvloop because both drive coroutines through
asyncio.Task, which only sees the futures we pass through untouched.
"""

from __future__ import annotations

import contextvars
from collections.abc import Coroutine, Generator
from time import perf_counter
from typing import Any, TypeVar

T = TypeVar("T")


class StepRecord:
    """Timing of one request's synchronous stretches."""

    __slots__ = ("max_step", "step_started", "steps")

    def __init__(self) -> None:
        self.max_step = 0.0
        self.step_started = 0.0
        self.steps = 0

    def max_step_so_far(self) -> float:
        """Longest step including the one running now (a handler asks while still in a step)."""
        running = perf_counter() - self.step_started if self.step_started else 0.0
        return max(self.max_step, running)


current_steps: contextvars.ContextVar[StepRecord | None] = contextvars.ContextVar(
    "looplab_current_steps", default=None
)


class _Stepped:
    """Awaitable that drives `coro` step by step, recording each step's duration."""

    __slots__ = ("_coro", "_record")

    def __init__(self, coro: Coroutine[Any, Any, T], record: StepRecord) -> None:
        self._coro = coro
        self._record = record

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, record = self._coro, self._record
        send_value: Any = None
        error: BaseException | None = None
        while True:
            record.step_started = started = perf_counter()
            try:
                yielded = coro.send(send_value) if error is None else coro.throw(error)
            except StopIteration as stop:
                self._finish_step(started)
                return stop.value
            except BaseException:
                self._finish_step(started)
                raise
            self._finish_step(started)
            try:
                send_value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and friends go into the handler
                error = exc
                send_value = None

    def _finish_step(self, started: float) -> None:
        record = self._record
        step = perf_counter() - started
        record.steps += 1
        record.step_started = 0.0
        if step > record.max_step:
            record.max_step = step


async def stepped(coro: Coroutine[Any, Any, T], record: StepRecord) -> T:
    """Await `coro`, timing each of its synchronous steps into `record`."""
    token = current_steps.set(record)
    try:
        result: T = await _Stepped(coro, record)
        return result
    finally:
        current_steps.reset(token)


def current_max_step_ms() -> float:
    """Longest step of the request being handled now, in ms (0 outside a profiled request)."""
    record = current_steps.get()
    return 0.0 if record is None else record.max_step_so_far() * 1000.0
