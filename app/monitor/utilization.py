"""Loop utilisation by cause: a thread asks the kernel what the loop thread does, 50 times a second.

Busy is every moment the loop thread is not waiting in its selector (epoll_wait and kin). Each
sample reads the loop thread's current system call (`/proc/self/task/<tid>/syscall`: a number, or
`running`) and CPU time (`.../schedstat`), every Python thread's CPU time (its CPU clock), and the
Python frames of all threads, and files the time since the previous sample under one cause:

- `idle`: in the selector. `syscall`: in another blocking call (named: clock_nanosleep for
  `time.sleep`, read, recvfrom, connect...). `cpu`: running Python (or C) code.
- `gil`: in futex, while this sampler had to wait for the GIL when it woke (someone held it) and
  another Python thread, not the loop, ran most of the interval: that thread and its frame are
  named. The sampler's own GIL take also leaves a running loop in futex; then the loop itself is
  the thread that ran, and the sample is `cpu`.
- `gc`: a `gc.callbacks` hook times every collection run on the loop thread (the sampler cannot
  sample during one: the collector holds the GIL), and that time is cut out of the interval.
- `unknown`: anything the evidence does not settle (a futex wait with no baseline yet, a long
  gap in sampling nobody's CPU time accounts for). Nothing is guessed.

A thread, not a loop callback, so it keeps sampling while the loop is stuck. Linux only; elsewhere
(no /proc) it does not start and utilisation is reported as null. Its cost: docs/utilization.md.
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.monitor import frames

CAUSES = ("cpu", "syscall", "gil", "gc", "unknown")
IDLE = "idle"
STARVED = "waiting for a CPU"  # the detail of a `cpu` sample whose loop waited for a core
INTERVAL_S = 0.02
WINDOW_S = 10.0
CONTENDED_S = 0.001  # the sampler woke this much late: someone held the GIL
GAP_INTERVALS = 3  # a sampling gap longer than this many intervals is accounted apart
IDLE_CPU_SHARE = 0.02  # a gap the loop used at most this share of, in its selector at both ends
GC_NAMED_S = 0.001  # collections this long keep where they ran, for the stall report


@dataclass(frozen=True, slots=True)
class SyscallTable:
    """The system call numbers of one architecture the classification needs."""

    selector: frozenset[int]  # epoll_wait and kin: the loop waiting for work (idle)
    futex: int  # a lock wait, the GIL's included
    names: Mapping[int, str]


# fmt: off
SYSCALLS: dict[str, SyscallTable] = {
    "x86_64": SyscallTable(
        selector=frozenset({232, 281, 441, 7, 271, 23, 270}),
        futex=202,
        names={
            0: "read", 1: "write", 3: "close", 7: "poll", 9: "mmap", 17: "pread64",
            18: "pwrite64", 19: "readv", 20: "writev", 23: "select", 35: "nanosleep",
            42: "connect", 43: "accept", 44: "sendto", 45: "recvfrom", 46: "sendmsg",
            47: "recvmsg", 61: "wait4", 74: "fsync", 75: "fdatasync", 202: "futex",
            230: "clock_nanosleep", 232: "epoll_wait", 257: "openat", 270: "pselect6",
            271: "ppoll", 281: "epoll_pwait", 288: "accept4", 441: "epoll_pwait2",
        },
    ),
    "aarch64": SyscallTable(
        selector=frozenset({22, 441, 72, 73}),
        futex=98,
        names={
            22: "epoll_pwait", 56: "openat", 57: "close", 63: "read", 64: "write",
            65: "readv", 66: "writev", 67: "pread64", 68: "pwrite64", 72: "pselect6",
            73: "ppoll", 82: "fsync", 83: "fdatasync", 98: "futex", 101: "nanosleep",
            115: "clock_nanosleep", 202: "accept", 203: "connect", 206: "sendto",
            207: "recvfrom", 211: "sendmsg", 212: "recvmsg", 222: "mmap", 242: "accept4",
            260: "wait4", 441: "epoll_pwait2",
        },
    ),
}
# fmt: on


class Sample(NamedTuple):
    t: float  # monotonic time of the sample
    dt: float  # wall seconds it stands for, gc time excluded
    cause: str  # IDLE or one of CAUSES
    detail: str | None  # the system call, or the thread holding the GIL
    where: str | None
    thread: str | None
    route: str | None
    gc: float  # seconds of loop-thread collections in the interval


class GcWindow(NamedTuple):
    start: float
    stop: float
    where: str | None
    route: str | None
    thread: str  # the thread that collected


@dataclass(frozen=True, slots=True)
class Explanation:
    """The dominant cause of a stretch of time and the code behind it."""

    cause: str
    where: str | None
    thread: str | None
    route: str | None
    detail: str | None


def proc_available() -> bool:
    """Whether this system exposes the per-thread files the sampler reads."""
    return platform.machine() in SYSCALLS and os.path.exists(
        f"/proc/self/task/{threading.get_native_id()}/syscall"
    )


def _read(fd: int) -> bytes:
    return os.pread(fd, 512, 0)


def thread_cpu_seconds(native_id: int) -> float:
    """CPU seconds of one thread of this process, by its kernel id; OSError once it has ended.

    Linux's per-thread CPU clock (MAKE_THREAD_CPUCLOCK in the kernel's posix-timers.h): one
    system call, no file held open per thread, and an unknown or ended id is an error, not a crash.
    """
    return time.clock_gettime((~native_id << 3) | 6)


def _overlap(windows: tuple[tuple[float, float], ...], start: float, end: float) -> float:
    """Seconds of `windows` (newest last) inside [start, end]."""
    total = 0.0
    for a, b in reversed(windows):
        if b <= start:
            break
        total += max(0.0, min(b, end) - max(a, start))
    return total


def _syscall_number(raw: bytes) -> int | None:
    """The system call a `/proc/.../syscall` line names (None: running, or unreadable)."""
    try:
        return int(raw.split(maxsplit=1)[0])
    except (ValueError, IndexError):
        return None


def _run_and_wait(fd: int) -> tuple[float, float]:
    """A thread's CPU seconds and seconds spent runnable waiting for a CPU (schedstat)."""
    fields = _read(fd).split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


class UtilizationSampler(Collector):
    """Samples the loop thread from its own thread; summaries and metrics read the samples."""

    def __init__(self, interval: float = INTERVAL_S, window: float = WINDOW_S) -> None:
        self.interval = interval
        self.window = window
        self.table = SYSCALLS.get(platform.machine())
        self.enabled = False
        self.busy_seconds = dict.fromkeys(CAUSES, 0.0)  # since start; gc's from the hook
        self.samples_taken = 0
        self._samples: deque[Sample] = deque(
            maxlen=int(window / max(interval, INTERVAL_S) * 2) + 16
        )
        self._gc_windows: deque[GcWindow] = deque(maxlen=64)
        # (start, stop) of the loop thread's recent collections, and how many there have been
        self._gc_loop: deque[tuple[float, float]] = deque(maxlen=512)
        self._gc_count = 0
        self._gc_started = 0.0
        self._gc_frame: FrameType | None = None
        self._loop_ident = 0
        self._last_cause = IDLE
        self._last_where: str | None = None
        self._loop_waited = 0.0  # seconds the loop thread was runnable without a CPU, last interval
        self._loop_tid = 0
        self._loop_name = ""
        self._started_at = 0.0
        self._running = threading.Lock()
        self._thread: threading.Thread | None = None
        self.native_id: int | None = None  # the sampler thread's, for measuring its own cost

    # lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling the calling thread (call it on the loop thread)."""
        if self.interval <= 0 or self.table is None or not proc_available():
            return
        current = threading.current_thread()
        self._loop_ident = threading.get_ident()
        self._loop_tid = threading.get_native_id()
        self._loop_name = current.name
        self._started_at = time.monotonic()
        self.enabled = True
        # first, so a collection's window is recorded before other hooks' Python code runs
        # (the GIL can pass to the sampler inside a hook)
        gc.callbacks.insert(0, self._on_gc)
        self._running.acquire()
        self._thread = threading.Thread(target=self._run, name="looplab-utilization", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._running.locked():
            self._running.release()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # the gc hook (runs on whichever thread collects) -------------------------------------

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # The collector is not reentrant and holds the GIL, so one start time serves every thread.
        # Only the loop thread's collections are loop time; another thread's still hold the
        # GIL, so they explain a stall of a loop that wanted to run meanwhile.
        if phase == "start":
            self._gc_started = time.monotonic()
            here = inspect.currentframe()
            self._gc_frame = here.f_back if here is not None else None
            del here  # a frame in its own locals is a reference cycle
            return
        stop = time.monotonic()
        pause = stop - self._gc_started
        on_loop = threading.get_ident() == self._loop_ident
        if on_loop:
            self._gc_loop.append((self._gc_started, stop))
            self._gc_count += 1
            self.busy_seconds["gc"] += pause
        frame, self._gc_frame = self._gc_frame, None
        if pause >= GC_NAMED_S:
            thread = self._loop_name if on_loop else threading.current_thread().name
            route = frames.route_of(frame) if on_loop else None
            self._gc_windows.append(
                GcWindow(self._gc_started, stop, frames.where(frame), route, thread)
            )

    # the sampling thread -----------------------------------------------------------------

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        base = f"/proc/self/task/{self._loop_tid}"
        syscall_fd = os.open(f"{base}/syscall", os.O_RDONLY)
        sched_fd = os.open(f"{base}/schedstat", os.O_RDONLY)
        # native id -> (CPU seconds, when read): read only when a sample needs it
        others: dict[int, tuple[float, float]] = {}
        selector = self.table.selector if self.table is not None else frozenset()
        jitter = random.Random().random
        try:
            prev = time.monotonic()
            loop_prev, wait_prev = _run_and_wait(sched_fd)
            gc_seen = self._gc_count
            due = prev + self.interval
            while not self._running.acquire(timeout=max(0.0, due - time.monotonic())):
                now = time.monotonic()
                contended = now - due > CONTENDED_S
                raw = _read(syscall_fd)
                loop_run, loop_wait = _run_and_wait(sched_fd)
                self._loop_waited = loop_wait - wait_prev
                gc_part = 0.0
                if self._gc_count != gc_seen:
                    gc_seen = self._gc_count
                    gc_part = _overlap(tuple(self._gc_loop), prev, now)
                span = now - prev - gc_part
                if span <= GAP_INTERVALS * self.interval and _syscall_number(raw) in selector:
                    # the common case, idle: nothing else to read
                    self._append(Sample(now, max(0.0, span), IDLE, None, None, None, None, gc_part))
                    self.samples_taken += 1
                    self._last_cause = IDLE
                else:
                    ran = dict(self._other_runtimes(others, now, now - prev))
                    self._record(
                        raw, now, now - prev, gc_part, loop_run - loop_prev, ran, contended
                    )
                prev, loop_prev, wait_prev = now, loop_run, loop_wait
                # random spacing (mean `interval`): a fixed one locks in phase with the loop's
                # own timers (the lag sampler's 20 ms tick) and counts each wake-up many times
                due = max(due, now) + self.interval * (0.5 + jitter())
        except OSError:
            self.enabled = False  # the loop thread is gone (shutdown): nothing left to sample
        finally:
            os.close(syscall_fd)
            os.close(sched_fd)

    def _other_runtimes(
        self, others: dict[int, tuple[float, float]], now: float, elapsed: float
    ) -> Iterable[tuple[int, float]]:
        """CPU seconds each other Python thread ran per `elapsed`, at its rate since last read.

        A thread seen for the first time has no rate yet and is left out.
        """
        seen = set()
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None or tid == self._loop_tid or tid == self.native_id:
                continue
            seen.add(tid)
            try:
                run = thread_cpu_seconds(tid)
            except OSError:
                continue  # the thread ended between enumerate() and the read
            entry = others.get(tid)
            others[tid] = (run, now)
            if entry is not None and now > entry[1]:
                last, then = entry
                yield tid, (run - last) / (now - then) * elapsed
        for tid in list(others):
            if tid not in seen:
                del others[tid]

    def _record(
        self,
        raw: bytes,
        now: float,
        elapsed: float,
        gc_part: float,
        loop_ran: float,
        others_ran: dict[int, float],
        contended: bool,
    ) -> None:
        current = sys._current_frames()
        try:
            loop_frame = current.get(self._loop_ident)
            span = max(0.0, elapsed - gc_part)
            cause, detail, thread, frame = self._classify(
                raw, loop_ran - gc_part, others_ran, contended, loop_frame, current
            )
            gap = span - self.interval if span > GAP_INTERVALS * self.interval else 0.0
            busy_loop = cause not in (IDLE, "gil")
            route = frames.route_of(loop_frame) if busy_loop else None
            where = frames.where(frame) if cause != IDLE else None
            if gap:
                idle_around = cause == IDLE and self._last_cause == IDLE
                filed = self._gap(now, gap, loop_ran - gc_part, others_ran, idle_around, current)
                # still running, and in the same code at both ends of the gap: that code
                same_code = where is not None and where == self._last_where
                if filed.cause == "cpu" and cause == "cpu" and same_code:
                    t, dt, _, why, _, holder, _, gc_s = filed
                    filed = Sample(t, dt, "cpu", why, where, holder, route, gc_s)
                self._append(filed)
            self._last_cause = cause
            self._last_where = where
            self._append(Sample(now, span - gap, cause, detail, where, thread, route, gc_part))
            self.samples_taken += 1
        finally:
            # the dict holds this thread's own frame, whose locals hold the dict: a reference
            # cycle per sample (and other threads' frames kept alive) until a collection
            current.clear()

    def _gap(
        self,
        now: float,
        gap: float,
        loop_ran: float,
        others_ran: dict[int, float],
        idle_around: bool,
        current: dict[int, FrameType],
    ) -> Sample:
        """The stretch this thread could not sample (the GIL held in C code, or no CPU).

        CPU times say who ran meanwhile: the loop (cpu), or another thread, all along (the loop
        waited for the GIL it held). A loop in its selector at both ends that used (almost) no
        CPU in between was idle: this thread just did not get a CPU (a loaded machine). Anything
        else: nobody knows what the loop did.
        """
        at = now - self.interval
        if loop_ran >= 0.5 * gap:
            return Sample(at, gap, "cpu", None, None, self._loop_name, None, 0.0)
        if idle_around and loop_ran <= IDLE_CPU_SHARE * gap:
            return Sample(at, gap, IDLE, None, None, None, None, 0.0)
        busiest = max(others_ran.items(), key=lambda item: item[1], default=None)
        if busiest is not None and busiest[1] >= 0.5 * gap:
            holder = _thread_named(busiest[0])
            if holder is not None and holder.ident is not None:
                held = frames.where(current.get(holder.ident))
                return Sample(at, gap, "gil", holder.name, held, holder.name, None, 0.0)
        # the loop was runnable but had no CPU (a machine busy with other processes): what it
        # would have done is not known, but why it did not is
        why = STARVED if self._loop_waited >= 0.5 * gap else None
        return Sample(at, gap, "unknown", why, None, None, None, 0.0)

    def _append(self, sample: Sample) -> None:
        self._samples.append(sample)
        if sample.cause != IDLE:
            self.busy_seconds[sample.cause] += sample.dt

    def _classify(
        self,
        raw: bytes,
        loop_ran: float,
        others_ran: dict[int, float],
        contended: bool,
        loop_frame: FrameType | None,
        current: dict[int, FrameType],
    ) -> tuple[str, str | None, str | None, FrameType | None]:
        """(cause, detail, thread, frame) of one sample."""
        table = self.table
        assert table is not None
        running = raw.startswith(b"running")
        if not running:
            try:
                number = int(raw.split(maxsplit=1)[0])
            except ValueError:
                return "unknown", None, self._loop_name, loop_frame
            if number < 0:  # blocked, but not in a system call (a page fault, a stop)
                return "unknown", "not in a system call", self._loop_name, loop_frame
            if number in table.selector:
                return IDLE, None, None, None
            if number != table.futex:
                name = table.names.get(number, f"syscall {number}")
                return "syscall", name, self._loop_name, loop_frame
        # Running, or in futex: this thread holds the GIL now, so the loop is not running Python.
        # If the GIL was held when this thread woke (contended), it was held by the loop itself
        # (it ran; it waits to get the GIL back) or by the thread that ran most: the loop waits
        # for the GIL. A futex wait the GIL does not explain is a lock wait.
        busiest = max(others_ran.items(), key=lambda item: item[1], default=None)
        if contended and busiest is not None and busiest[1] > max(loop_ran, 0.0):
            holder = _thread_named(busiest[0])
            if holder is not None and holder.ident is not None:
                return "gil", holder.name, holder.name, current.get(holder.ident)
            return "unknown", "the GIL's holder ended", self._loop_name, loop_frame
        if running or (contended and loop_ran > 0.0):
            # runnable is CPU demand; say so when it waited for a core longer than it ran (a
            # machine busy with other processes)
            starved = self._loop_waited > max(loop_ran, 0.0)
            return "cpu", STARVED if starved else None, self._loop_name, loop_frame
        return "syscall", "futex", self._loop_name, loop_frame

    # reading -----------------------------------------------------------------------------

    def _snapshot(self) -> tuple[Sample, ...]:
        return tuple(self._samples)  # one C-level copy: consistent against the sampling thread

    def samples(self) -> list[Sample]:
        """The samples of the last `window` seconds or so, oldest first."""
        return list(self._snapshot())

    def summary(self) -> dict[str, Any] | None:
        """`/stats` `utilization`: busy fractions of the last 1 s and 10 s, by cause (10 s)."""
        if not self.enabled:
            return None
        now = time.monotonic()
        samples = self._snapshot()
        last_1s = self._fractions(samples, now, 1.0)
        last_10s = self._fractions(samples, now, self.window)
        # of `cpu`, the part the loop was runnable but had no core: the machine's other load
        starved_1s, starved_10s = last_1s.pop(STARVED), last_10s.pop(STARVED)
        return {
            "last_1s": round(sum(last_1s.values()), 4),
            "last_10s": round(sum(last_10s.values()), 4),
            "by_cause": {c: round(v, 4) for c, v in last_10s.items()},
            "by_cause_1s": {c: round(v, 4) for c, v in last_1s.items()},
            "waiting_for_cpu": {"last_1s": round(starved_1s, 4), "last_10s": round(starved_10s, 4)},
            "top": self._top(samples, now),
            "samples": self.samples_taken,
            "sampler_cpu_s": self.own_cpu_seconds(),
        }

    def own_cpu_seconds(self) -> float | None:
        """CPU seconds the sampling thread itself has used (its cost; docs/utilization.md)."""
        if self.native_id is None:
            return None
        try:
            return round(thread_cpu_seconds(self.native_id), 4)
        except OSError:
            return None

    def _top(self, samples: tuple[Sample, ...], now: float, n: int = 5) -> list[dict[str, Any]]:
        """The code the loop was busy in most over the window: `{cause, where, share}`."""
        horizon = now - self.window
        span = min(self.window, now - self._started_at)
        shares: dict[tuple[str, str | None, str | None], float] = {}
        for s in samples:
            if s.t > horizon and s.cause != IDLE:
                key = (s.cause, s.detail if s.cause == "syscall" else None, s.where)
                shares[key] = shares.get(key, 0.0) + s.dt
        ranked = sorted(shares.items(), key=lambda item: item[1], reverse=True)[:n]
        return [
            {"cause": c, "detail": d, "where": w, "share": round(v / span, 4) if span else 0.0}
            for (c, d, w), v in ranked
        ]

    def _fractions(
        self, samples: tuple[Sample, ...], now: float, window: float
    ) -> dict[str, float]:
        horizon = now - window
        span = min(window, now - self._started_at)
        sums = dict.fromkeys((*CAUSES, STARVED), 0.0)
        for s in reversed(samples):
            if s.t <= horizon:
                break
            inside = min(1.0, (s.t - horizon) / (s.dt + s.gc)) if s.dt + s.gc > 0 else 1.0
            if s.cause != IDLE:
                sums[s.cause] += s.dt * inside
                if s.detail == STARVED:
                    sums[STARVED] += s.dt * inside
            sums["gc"] += s.gc * inside
        return {c: (v / span if span > 0 else 0.0) for c, v in sums.items()}

    def explain(self, start: float, end: float) -> Explanation:
        """The cause that took most of [start, end] (monotonic) and the code behind it."""
        return explain(self._snapshot(), tuple(self._gc_windows), start, end)

    def collect(self) -> Iterable[Metric]:
        if not self.enabled:
            return
        summary = self.summary()
        assert summary is not None
        yield GaugeMetricFamily(
            "looplab_loop_utilization",
            "Fraction of the last 10 s the loop thread was not waiting in its selector.",
            value=summary["last_10s"],
        )
        busy = CounterMetricFamily(
            "looplab_loop_busy_seconds",
            "Seconds the loop thread was busy, by cause (cpu, syscall, gil, gc, unknown).",
            labels=["cause"],
        )
        for cause in CAUSES:
            busy.add_metric([cause], self.busy_seconds[cause])
        yield busy


def _thread_named(native_id: int) -> threading.Thread | None:
    for thread in threading.enumerate():
        if thread.native_id == native_id:
            return thread
    return None


def explain(
    samples: Iterable[Sample], gc_windows: Iterable[GcWindow], start: float, end: float
) -> Explanation:
    """The cause that took most of [start, end] and the place that took most of that cause.

    Places are summed over samples, and a known place comes before an unknown one: a gap the
    sampler could not see into names no line, and must not hide the line every other sample saw.
    """
    weights = dict.fromkeys(CAUSES, 0.0)
    places: dict[str, dict[tuple[str | None, str | None, str | None, str | None], float]] = {
        c: {} for c in CAUSES
    }
    for s in samples:
        overlap = min(s.t, end) - max(s.t - s.dt, start)
        if overlap <= 0 or s.cause == IDLE:
            continue
        weights[s.cause] += overlap
        key = (s.where, s.thread, s.route, s.detail)
        places[s.cause][key] = places[s.cause].get(key, 0.0) + overlap
    for w in gc_windows:
        overlap = min(w.stop, end) - max(w.start, start)
        if overlap > 0:
            weights["gc"] += overlap
            # the sampler cannot run during a collection: what it could not see is this
            weights["unknown"] = max(0.0, weights["unknown"] - overlap)
            key = (w.where, w.thread, w.route, None)
            places["gc"][key] = places["gc"].get(key, 0.0) + overlap
    cause = max(CAUSES, key=lambda c: weights[c])
    if weights[cause] <= 0:
        return Explanation("unknown", None, None, None, None)
    # a known place before an unknown one, then the one with the most time
    ranked = places[cause]
    where, thread, route, detail = max(ranked, key=lambda k: (k[0] is not None, ranked[k]))
    return Explanation(cause, where, thread, route, detail)
