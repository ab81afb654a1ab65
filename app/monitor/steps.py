"""A request's steps: the stretches its handler ran on the loop without yielding to it.

A coroutine runs on the loop in steps: each `send()` into it runs synchronously until its next
`await` that really suspends. Each route's metered handler (app.monitor.metering) sends into
the route's handler itself and times every step, so a handler that calls `time.sleep(0.2)` shows
one 200 ms step while one that awaits shows only microsecond steps. This module holds what a
request's timing is read through: its `StepRecord`, stored in the request under `STEPS`.
"""

from __future__ import annotations

from time import perf_counter

from aiohttp import web


class StepRecord:
    """Timing of one request's steps (perf_counter seconds), filled in by the driver.

    No `__init__`: the driver sets every field before the handler's first step (a Python
    `__init__` would cost a call per request), so only a reader on another thread can find one
    unset, and reads `started` with a default.
    """

    __slots__ = ("max_step", "started", "step_started")

    max_step: float
    started: float  # the request's start (/tasks reads a request task's age here)
    step_started: float  # start of the step running now; 0.0 between steps

    def max_step_so_far(self) -> float:
        """Longest step including the one running now (a handler asks while still in a step)."""
        running = perf_counter() - self.step_started if self.step_started else 0.0
        return max(self.max_step, running)


# a request key, not a context variable: setting and resetting one costs more per request
STEPS: web.RequestKey[StepRecord] = web.RequestKey("looplab_steps", StepRecord)


def current_max_step_ms(request: web.BaseRequest) -> float:
    """Longest step so far of `request`, in ms, the running one included (0 if not profiled)."""
    try:
        timing = request[STEPS]  # one lookup: a Mapping's get() would cost two Python calls
    except KeyError:
        return 0.0
    return timing.max_step_so_far() * 1000.0
