"""Per-request step profiler: the longest stretch a handler ran without yielding to the loop.

A coroutine runs on the loop in "steps": each `send()` into it runs synchronously until its next
`await` that really suspends. `drive()` drives the handler coroutine itself, timing every step, so
a handler that calls `time.sleep(0.2)` shows one 200 ms step while one that awaits shows only
microsecond steps. It works the same on asyncio and uvloop because both drive coroutines through
asyncio.Task, which only sees the futures we pass through untouched.

Every request is driven this way, so the stepping is kept cheap (docs/benchmarks.md,
"Instrumentation overhead"): a plain generator, per-step state in locals, two clock reads per
step. The request path runs the same loop inlined with its accounting in app.monitor.middleware;
`stepped()` here profiles any coroutine.

The request path has a C implementation too, `app.monitor._stepdriver` (an optional extension
built at install; `extension()` says whether it runs). Without a compiler, or with
LOOP_LAB_NO_EXTENSIONS=1, the pure-Python code here and in middleware/routes runs instead.
"""

from __future__ import annotations

import contextvars
import os
import types
from collections.abc import Awaitable, Coroutine, Generator
from time import perf_counter
from types import ModuleType
from typing import Any, Protocol, TypeVar

try:
    from app.monitor import _stepdriver
except ImportError:  # not built (no compiler at install time): the pure-Python driver runs
    _stepdriver = None  # type: ignore[assignment]
speedups = _stepdriver  # the C extension module where it was built, else None

T = TypeVar("T")
NO_EXTENSIONS_ENV = "LOOP_LAB_NO_EXTENSIONS"


def extension() -> ModuleType | None:
    """The C step driver, unless it was not built or LOOP_LAB_NO_EXTENSIONS is set (not "0")."""
    if os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0"):
        return None
    return speedups


class StepTiming(Protocol):
    """What a handler reads about its own request mid-step: a StepRecord or the C StepDriver."""

    def max_step_so_far(self) -> float: ...


class StepRecord:
    """Timing of one request's synchronous stretches (perf_counter seconds)."""

    __slots__ = ("max_step", "started", "step_started", "steps")

    def __init__(self) -> None:
        self.max_step = 0.0
        self.step_started = 0.0  # start of the step running now; 0.0 between steps
        self.steps = 0
        self.started = 0.0  # start of the first step

    def max_step_so_far(self) -> float:
        """Longest step including the one running now (a handler asks while still in a step)."""
        running = perf_counter() - self.step_started if self.step_started else 0.0
        return max(self.max_step, running)


current_steps: contextvars.ContextVar[StepTiming | None] = contextvars.ContextVar(
    "looplab_current_steps", default=None
)


def drive_steps(
    coro: Coroutine[Any, Any, T] | Generator[Any, Any, T], record: StepRecord
) -> Generator[Any, Any, T]:
    """Run `coro` to completion one step at a time, timing each step into `record`.

    Use it with `yield from` inside another generator-based coroutine, or `await drive(...)`.
    Whatever the coroutine yields (futures) goes up to the Task untouched; whatever the Task sends
    or throws (results, cancellation) goes down into the coroutine.
    """
    # locals, not attributes, except what a handler may read mid-step through `current_steps`
    # (the running step's start, the longest step so far)
    send = coro.send
    send_value: Any = None
    error: BaseException | None = None
    steps = 0
    record.started = started = perf_counter()
    try:
        while True:
            record.step_started = started
            yielded = send(send_value) if error is None else coro.throw(error)
            step = perf_counter() - started
            steps += 1
            if step > record.max_step:
                record.max_step = step
            record.step_started = 0.0
            try:
                send_value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and friends go into the handler
                error = exc
                send_value = None
            started = perf_counter()
    except StopIteration as stop:  # the handler returned: its last step ends here
        _end_last_step(record, started, steps)
        result: T = stop.value
        return result
    except GeneratorExit:
        raise  # closed between steps: no step was running
    except BaseException:
        _end_last_step(record, started, steps)
        raise


def _end_last_step(record: StepRecord, started: float, steps: int) -> None:
    ended = perf_counter()
    record.step_started = 0.0
    record.steps = steps + 1
    if ended - started > record.max_step:
        record.max_step = ended - started


drive = types.coroutine(drive_steps)
"""`await drive(coro, record)`: `drive_steps` as an awaitable, with no extra coroutine frame."""


async def stepped(coro: Coroutine[Any, Any, T], record: StepRecord) -> T:
    """Await `coro`, timing each of its synchronous steps into `record`; `current_steps` is set."""
    token = current_steps.set(record)
    try:
        awaitable: Awaitable[T] = drive(coro, record)
        return await awaitable
    finally:
        current_steps.reset(token)


def current_max_step_ms() -> float:
    """Longest step of the request being handled now, in ms (0 outside a profiled request)."""
    record = current_steps.get()
    return 0.0 if record is None else record.max_step_so_far() * 1000.0
