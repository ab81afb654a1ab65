"""Loop-lag sampler: how late the loop runs a timer it was asked to run on time.

A callback re-arms itself every `interval` with `call_at`; the difference between when it was due
and when it ran is time the loop spent on something else (a blocking handler, a long callback).
A callback chain costs less than a task and behaves the same on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.percentiles import percentile

LAG_INTERVAL_S = 0.02  # 50 ticks a second: 500 lags in the 10 s window behind p99


@dataclass(frozen=True, slots=True)
class LagSummary:
    p50_ms: float
    p99_ms: float
    max_ms: float
    samples: int

    def as_dict(self) -> dict[str, float]:
        return {"p50": self.p50_ms, "p99": self.p99_ms, "max": self.max_ms}


class LagSampler:
    """Measures loop lag continuously; keeps a rolling window and feeds a histogram."""

    def __init__(
        self,
        interval: float = LAG_INTERVAL_S,
        window: float = 10.0,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.interval = interval
        self.window = window
        self._observe = observe
        self._samples: deque[tuple[float, float]] = deque()  # (monotonic time, lag seconds)
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        # monotonic time of the last loop turn we saw; the watchdog thread reads it
        self.heartbeat = time.monotonic()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.heartbeat = time.monotonic()  # not the construction time: startup is no stall
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop it samples (once started)."""
        assert self._loop is not None, "lag sampler not started"
        return self._loop

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lag = max(0.0, now - self._due)
        wall = time.monotonic()
        self.heartbeat = wall
        self._samples.append((wall, lag))
        if self._observe is not None:
            self._observe(lag)
        horizon = wall - self.window
        samples = self._samples
        while samples and samples[0][0] < horizon:
            samples.popleft()
        # re-arm from now, not from the missed due time, so one stall is one sample, not a burst
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def summary(self, window: float | None = None) -> LagSummary:
        """p50/p99/max over the last `window` seconds."""
        horizon = time.monotonic() - (self.window if window is None else window)
        lags = sorted(lag for t, lag in self._samples if t >= horizon)
        return LagSummary(
            p50_ms=percentile(lags, 0.50) * 1000.0,
            p99_ms=percentile(lags, 0.99) * 1000.0,
            max_ms=(lags[-1] if lags else 0.0) * 1000.0,
            samples=len(lags),
        )
