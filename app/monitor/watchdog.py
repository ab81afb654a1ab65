"""Stall watchdog: a thread that notices when the loop has not run, and says where it is stuck.

The loop cannot report its own stall (it is the thing that is stuck), so a plain thread watches the
lag sampler's heartbeat. Once per stall it logs the loop thread's current stack, the routes in
flight and the cause so far (from the utilisation sampler's samples): the handler that is holding
the loop is named while it still holds it. When the loop runs again, the lag sampler's next tick
closes the stall (`stall_ended`, on the loop thread): its length, dominant cause, frame and route
go into `recent` and the per-cause count. A stall the thread could not see live (a collection holds
the GIL, so the thread cannot run during it) is logged then.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from app.monitor.utilization import Explanation

log = logging.getLogger("loop_lab.watchdog")

RECENT_STALLS = 20


class StallWatchdog:
    def __init__(
        self,
        heartbeat: Callable[[], float],
        threshold: float,
        loop_thread_id: int,
        in_flight_routes: Callable[[], dict[str, int]],
        on_stall: Callable[[str], None] | None = None,
        explain: Callable[[float, float], Explanation] | None = None,
        started: float | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self.threshold = threshold
        self._loop_thread_id = loop_thread_id
        self._in_flight_routes = in_flight_routes
        self._on_stall = on_stall
        self._explain = explain
        self.started = time.monotonic() if started is None else started  # the server's start
        # held while the watchdog runs; stop() releases it. Waiting on it with a timeout is one C
        # call per check (an Event's wait runs a Condition in Python each time)
        self._running = threading.Lock()
        self._running.acquire()
        self._thread = threading.Thread(target=self._run, name="looplab-watchdog", daemon=True)
        self.stalls = 0
        self.last_report: str | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_STALLS)
        self._reported_beat = -1.0  # the heartbeat a live report was made for
        self._live_routes: dict[str, int] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._running.locked():
            self._running.release()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # check several times per threshold so a stall is caught soon after it crosses the line
        while not self._running.acquire(timeout=self.threshold / 4):
            beat = self._heartbeat()
            now = time.monotonic()
            stalled_for = now - beat
            if stalled_for > self.threshold and beat != self._reported_beat:
                self._reported_beat = beat  # one warning per stall, however long it lasts
                self._report(stalled_for, self._explanation(beat, now))

    def _explanation(self, start: float, end: float) -> Explanation:
        if self._explain is None:
            return Explanation("unknown", None, None, None, None)
        return self._explain(start, end)

    def _report(self, stalled_for: float, cause: Explanation) -> None:
        frame = sys._current_frames().get(self._loop_thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
        routes = self._live_routes = self._in_flight_routes()
        in_flight = ", ".join(f"{route} x{n}" for route, n in sorted(routes.items())) or "none"
        self.last_report = (
            f"event loop stalled for {stalled_for * 1000:.0f} ms "
            f"(threshold {self.threshold * 1000:.0f} ms), cause so far: {_describe(cause)}; "
            f"in flight: {in_flight}; loop thread stack (most recent call last):\n{stack}"
        )
        log.warning("%s", self.last_report)

    def stall_ended(self, beat_before: float, lag: float, now: float) -> dict[str, Any]:
        """Record a stall the loop has just come out of (called on the loop thread).

        `beat_before` is the last heartbeat before it, `lag` how late the lag timer then ran.
        """
        start = max(now - lag, self.started)
        cause = self._explanation(start, now)
        route = cause.route
        live = beat_before == self._reported_beat
        if route is None and live and len(self._live_routes) == 1:
            route = next(iter(self._live_routes))
        entry = {
            "started_s": round(max(0.0, start - self.started), 3) + 0.0,  # never -0.0
            "duration_ms": round(lag * 1000.0, 1),
            "cause": cause.cause,
            "detail": cause.detail,
            "where": cause.where,
            "thread": cause.thread,
            "route": route,
        }
        self.recent.append(entry)
        self.stalls += 1
        if self._on_stall is not None:
            self._on_stall(cause.cause)
        if not live:
            self.last_report = (
                f"event loop stalled: no turn for {(now - beat_before) * 1000:.0f} ms "
                f"(threshold {self.threshold * 1000:.0f} ms), cause: {_describe(cause)}; "
                f"route: {route or 'none'} (seen once it ended)"
            )
            log.warning("%s", self.last_report)
        return entry

    def recent_stalls(self) -> list[dict[str, Any]]:
        return list(self.recent)


def _describe(cause: Explanation) -> str:
    text = cause.cause
    if cause.detail:
        text += f" ({cause.detail})"
    if cause.where:
        text += f" at {cause.where}"
    if cause.cause == "gil" and cause.thread:
        text += f" in thread {cause.thread}"
    return text
