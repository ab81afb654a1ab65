"""Stall watchdog: a thread that notices when the loop has not run, and says where it is stuck.

The loop cannot report its own stall (it is the thing that is stuck), so a plain thread watches the
lag sampler's heartbeat. Once per stall it logs the loop thread's current stack and the routes in
flight: the handler that is holding the loop is named while it still holds it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("loop_lab.watchdog")


class StallWatchdog:
    def __init__(
        self,
        heartbeat: Callable[[], float],
        threshold: float,
        loop_thread_id: int,
        in_flight_routes: Callable[[], dict[str, int]],
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self.threshold = threshold
        self._loop_thread_id = loop_thread_id
        self._in_flight_routes = in_flight_routes
        self._on_stall = on_stall
        # held while the watchdog runs; stop() releases it. Waiting on it with a timeout is one C
        # call per check (an Event's wait runs a Condition in Python each time)
        self._running = threading.Lock()
        self._running.acquire()
        self._thread = threading.Thread(target=self._run, name="looplab-watchdog", daemon=True)
        self.stalls = 0
        self.last_report: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._running.locked():
            self._running.release()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        reported_beat = -1.0
        # check several times per threshold so a stall is caught soon after it crosses the line
        while not self._running.acquire(timeout=self.threshold / 4):
            beat = self._heartbeat()
            stalled_for = time.monotonic() - beat
            if stalled_for > self.threshold and beat != reported_beat:
                reported_beat = beat  # one warning per stall, however long it lasts
                self.stalls += 1
                self._report(stalled_for)
                if self._on_stall is not None:
                    self._on_stall()

    def _report(self, stalled_for: float) -> None:
        frame = sys._current_frames().get(self._loop_thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
        routes = self._in_flight_routes()
        in_flight = ", ".join(f"{route} x{n}" for route, n in sorted(routes.items())) or "none"
        self.last_report = (
            f"event loop stalled for {stalled_for * 1000:.0f} ms "
            f"(threshold {self.threshold * 1000:.0f} ms); in flight: {in_flight}; "
            f"loop thread stack (most recent call last):\n{stack}"
        )
        log.warning("%s", self.last_report)
