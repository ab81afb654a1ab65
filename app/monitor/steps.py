"""Per-request step profiler: the longest stretch a handler ran without yielding to the loop.

A coroutine runs on the loop in "steps": each `send()` into it runs synchronously until its next
`await` that really suspends. The request path (app.monitor.middleware) drives the handler
coroutine itself, timing every step, so a handler that calls `time.sleep(0.2)` shows one 200 ms
step while one that awaits shows only microsecond steps. It works the same on asyncio and uvloop
because both drive coroutines through asyncio.Task, which only sees the futures we pass through
untouched.

Every request is driven this way, so the stepping is kept cheap (docs/benchmarks.md,
"Instrumentation overhead"): a plain generator, per-step state in locals, two clock reads per
step, inlined with the request's accounting. This module holds what a request's timing is read
through: its `StepRecord`, stored in the request under `STEPS` (a request key, not a context
variable: setting and resetting one cost more per request than storing a key).

The request path has a C implementation too, `app.monitor._stepdriver` (an optional extension
built at install; `extension()` says whether it runs). Without a compiler, or with
LOOP_LAB_NO_EXTENSIONS=1, the pure-Python code here and in middleware/routes runs instead.
"""

from __future__ import annotations

import os
from time import perf_counter
from types import ModuleType
from typing import Protocol

from aiohttp import web

try:
    from app.monitor import _stepdriver
except ImportError:  # not built (no compiler at install time): the pure-Python driver runs
    _stepdriver = None  # type: ignore[assignment]
speedups = _stepdriver  # the C extension module where it was built, else None

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

    __slots__ = ("max_step", "started", "step_started")

    def __init__(self) -> None:
        self.max_step = 0.0
        self.step_started = 0.0  # start of the step running now; 0.0 between steps
        self.started = 0.0  # start of the first step

    def max_step_so_far(self) -> float:
        """Longest step including the one running now (a handler asks while still in a step)."""
        running = perf_counter() - self.step_started if self.step_started else 0.0
        return max(self.max_step, running)


STEPS: web.RequestKey[StepTiming] = web.RequestKey("looplab_steps")


def current_max_step_ms(request: web.BaseRequest) -> float:
    """Longest step so far of `request`, in ms, the running one included (0 if not profiled)."""
    timing = request.get(STEPS)
    return 0.0 if timing is None else timing.max_step_so_far() * 1000.0
