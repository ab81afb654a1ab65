"""How the server runs CPython's cyclic garbage collector (`--gc`), and how long its pauses are.

Every collection runs on whichever thread allocated last, holding the GIL: for the loop, it is
loop lag. A full (generation-2) collection walks every live container object, and at 10,000
connections with a request parked on each that is over half a million of them: 0.1-0.7 s per
collection here (docs/benchmarks.md, "The garbage collector at 10,000 connections"). CPython 3.11
runs one whenever the oldest generation has seen 10 younger collections *and* has grown by 25%
since the last one, so a server that is still gaining connections, or turning requests over that
live long enough to be promoted, runs them again and again and finds nothing to free.

Modes (per process: the collector is the interpreter's, so every server in a process shares it):

- `default`: CPython as shipped (3.11: thresholds 700, 10, 10), so the pauses stay demonstrable.
- `tuned`: one `gc.collect()` then `gc.freeze()` once the app has started, so the objects of
  the imports and of the app itself leave every later collection; young collections on a clock
  (`YoungSweeper`: generation 0 every `SWEEP_INTERVAL_S`, generation 1 every
  `SWEEPS_PER_MIDDLE`th time) as well as by count; and a generation-2 threshold of 1000
  (`TUNED_THRESHOLDS`), so a full collection waits for 1000 generation-1 collections instead
  of 10. The clock is there because CPython counts allocations *minus deallocations* towards
  the young threshold: in a server whose requests free about as much as they allocate, the
  count rarely reaches it, while the young generation fills with every request in flight
  (measured at 10,000 connections with the count alone: a young collection every ~3 s, walking
  them all, up to 94 ms). On a clock its size is bounded by what 50 ms of requests leave alive,
  whatever the concurrency. A lower count threshold (100) bounded it too, but then a busy
  hello-world server collected on almost every batch of requests (a third of loop-lab's cost
  over bare aiohttp, docs/benchmarks.md, "Instrumentation overhead"). Reference cycles that die
  young are still freed at once; cycles that outlive two young collections wait for the rare
  full one.
- `off`: `gc.disable()`: no automatic collection; memory held only by reference cycles is never
  freed. For experiments, not for a service.

`GcPauses` times every collection, by count or by clock, with a `gc.callbacks` hook (two calls
per collection, none per request) and exports `looplab_gc_pause_seconds{generation}` and the
`/stats` `gc` section.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.config import GcMode
from app.keys import GC, METRICS, SETTINGS, SWEEPER
from app.metrics import LAG_BUCKETS

log = logging.getLogger("loop_lab.gc")

GENERATIONS = 3

# Chosen by measurement (docs/benchmarks.md, "The garbage collector at 10,000 connections"):
# generation 0 keeps CPython's count as a backstop for allocation bursts, the clock below does
# the regular young collections.
SHIPPED_THRESHOLDS = gc.get_threshold()  # this interpreter's, read before anyone changes them
# 3.14's collector is incremental: two generations, and set_threshold ignores a third value, so
# there is no full-collection threshold to raise there (3.15 went back to the generational one)
INCREMENTAL = sys.version_info[:2] == (3, 14)
TUNED_THRESHOLDS = SHIPPED_THRESHOLDS if INCREMENTAL else (700, 10, 1000)
SWEEP_INTERVAL_S = 0.05
SWEEPS_PER_MIDDLE = 5  # every 5th sweep collects generation 1 too (survivors of 0.25 s)

_LE = (*LAG_BUCKETS, float("inf"))
_LE_TEXT = tuple("+Inf" if b == float("inf") else repr(float(b)) for b in _LE)


class GcPauses(Collector):
    """Counts and times every collection of this process, from `start()` to `stop()`."""

    def __init__(self, mode: GcMode) -> None:
        self.mode = mode
        self.collections = [0] * GENERATIONS
        self.collected = [0] * GENERATIONS  # unreachable objects found (freed or uncollectable)
        self.pause_sum = [0.0] * GENERATIONS
        self.pause_max = [0.0] * GENERATIONS
        self.buckets = [[0] * len(_LE) for _ in range(GENERATIONS)]
        self.active = False
        self._started = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self.active = True

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self.active = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # the collector is not reentrant (no collection starts inside another), so one start
        # time is enough; runs on the thread that triggered the collection, under the GIL
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation: int = info["generation"]
        self.collections[generation] += 1
        self.collected[generation] += info["collected"]
        self.pause_sum[generation] += pause
        if pause > self.pause_max[generation]:
            self.pause_max[generation] = pause
        self.buckets[generation][bisect_left(_LE, pause)] += 1

    def as_dict(self) -> dict[str, Any]:
        """The `/stats` `gc` section: mode, collector state, and pauses per generation."""
        thresholds = gc.get_threshold()
        return {
            "mode": self.mode,
            "enabled": gc.isenabled(),
            "frozen_objects": gc.get_freeze_count(),
            # young collections on a clock as well as by count (`tuned`), else by count only
            "young_sweep_ms": SWEEP_INTERVAL_S * 1000.0 if self.mode == "tuned" else None,
            "generations": [
                {
                    "threshold": thresholds[g],
                    "collections": self.collections[g],
                    "collected_objects": self.collected[g],
                    "pause_ms_total": round(self.pause_sum[g] * 1000.0, 3),
                    "pause_ms_max": round(self.pause_max[g] * 1000.0, 3),
                }
                for g in range(GENERATIONS)
            ],
        }

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "looplab_gc_pause_seconds",
            "Time each cyclic garbage collection held the GIL (and so the loop), by generation.",
            labels=["generation"],
        )
        for g in range(GENERATIONS):
            counts = list(self.buckets[g])
            cumulative, total = [], 0
            for le, n in zip(_LE_TEXT, counts, strict=True):
                total += n
                cumulative.append((le, total))
            family.add_metric([str(g)], cumulative, self.pause_sum[g])
        yield family


class YoungSweeper:
    """Collects the young generations on the loop's clock (`--gc tuned`).

    Generation 0 every `interval`, generations 0 and 1 every `per_middle`th time: the walk of
    each is bounded by what requests of that long are still holding, not by how far the
    allocation count happened to drift.
    """

    def __init__(
        self, interval: float = SWEEP_INTERVAL_S, per_middle: int = SWEEPS_PER_MIDDLE
    ) -> None:
        self.interval = interval
        self.per_middle = per_middle
        self.sweeps = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(self.interval, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        assert self._loop is not None
        self.sweeps += 1
        gc.collect(1 if self.sweeps % self.per_middle == 0 else 0)
        self._timer = self._loop.call_later(self.interval, self._sweep)


class _ProcessCollector:
    """The interpreter's collector, set by the servers of this process and restored after them.

    Tests run several servers in one process; the first one to start remembers how the collector
    was, the last one to stop puts it back. The mode of the last server started wins meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[tuple[int, int, int], bool] | None = None

    def apply(self, mode: GcMode) -> str:
        with self._lock:
            if self._users == 0:
                self._saved = (gc.get_threshold(), gc.isenabled())
            self._users += 1
            if mode == "off":
                gc.disable()
                return "off: gc.disable(), no automatic collections (reference cycles leak)"
            gc.enable()
            if mode == "default":
                assert self._saved is not None
                gc.set_threshold(*self._saved[0])
                return f"default: CPython as shipped, thresholds {gc.get_threshold()}"
            gc.collect()  # free startup garbage first: frozen objects are never collected
            gc.freeze()  # everything alive now (imports, the app) leaves every collection
            gc.set_threshold(*TUNED_THRESHOLDS)
            rarer = (
                "as shipped: the incremental collector has no full-collection threshold"
                if INCREMENTAL
                else f"full collections {TUNED_THRESHOLDS[2] // SHIPPED_THRESHOLDS[2]}x rarer"
            )
            return (
                f"tuned: gc.freeze() moved {gc.get_freeze_count()} startup objects out of every "
                f"collection; young ones every {SWEEP_INTERVAL_S * 1000:g} ms as well as by "
                f"count, thresholds {TUNED_THRESHOLDS} ({rarer})"
            )

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._saved is None:
                return
            thresholds, enabled = self._saved
            gc.unfreeze()
            gc.set_threshold(*thresholds)
            if enabled:
                gc.enable()
            else:
                gc.disable()
            self._saved = None


_PROCESS = _ProcessCollector()


def setup(app: web.Application) -> None:
    """Apply `--gc` when the app starts (after every other startup step) and time collections."""
    app[GC] = GcPauses(app[SETTINGS].gc)
    app[SWEEPER] = YoungSweeper()
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)


async def _start(app: web.Application) -> None:
    pauses = app[GC]
    # on_startup runs after the cleanup contexts: the monitor, the pools and the app exist now,
    # and what they allocated is frozen with the imports
    log.info("garbage collector %s", _PROCESS.apply(pauses.mode))
    pauses.start()
    if pauses.mode == "tuned":
        app[SWEEPER].start(asyncio.get_running_loop())
    app[METRICS].registry.register(pauses)


async def _stop(app: web.Application) -> None:
    pauses = app[GC]
    if not pauses.active:
        return  # the app failed to start before the collector was set
    app[SWEEPER].stop()
    pauses.stop()
    app[METRICS].registry.unregister(pauses)
    _PROCESS.release()
