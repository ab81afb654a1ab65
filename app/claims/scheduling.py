"""Claims about how the loop schedules: order, iterations, timers, the loop clock, stop, cancel."""

from __future__ import annotations

import asyncio
import itertools
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator
from contextlib import closing

from app.claims.probes import ms, per_loop, polled_loop, run_on
from app.claims.registry import Outcome, claim, per_loop_evidence, verdict_of
from app.loops import LoopName, new_event_loop

# The first example's delays (1.0 s and 0.5 s) are scaled down so the run stays fast.
SCALE = 0.1
FIRST_OUTPUT = """task1 starting...
task2 starting...
task2 done after 0.5s
task1 done after 1.0s
Results: ['data from task1', 'data from task2']"""


@claim(
    "first_example_order",
    claim="The first example prints its five lines in the order shown, task2 finishing first.",
    quote=FIRST_OUTPUT,
)
def first_example_order() -> Outcome:
    def run(name: LoopName) -> tuple[list[str], dict[str, float], float]:
        lines: list[str] = []
        resumed: dict[str, float] = {}

        async def main() -> float:
            start = time.monotonic()

            async def fetch_data(task: str, delay: float) -> str:
                lines.append(f"{task} starting...")
                await asyncio.sleep(delay * SCALE)
                lines.append(f"{task} done after {delay}s")
                resumed[task] = time.monotonic() - start
                return f"data from {task}"

            task1 = asyncio.create_task(fetch_data("task1", 1.0))
            task2 = asyncio.create_task(fetch_data("task2", 0.5))
            results = await asyncio.gather(task1, task2)
            lines.append(f"Results: {results}")
            return time.monotonic() - start

        total = run_on(name, main)
        return lines, resumed, total

    runs = per_loop(run)
    expected = FIRST_OUTPUT.splitlines()
    checks = {name: lines == expected for name, (lines, _, _) in runs.items()}
    parts = {
        name: (
            ("the article's 5 lines in its order" if checks[name] else f"printed {lines}")
            + f"; task2 resumed at {ms(at['task2'])}, task1 at {ms(at['task1'])}, "
            f"total {ms(total)}"
        )
        for name, (lines, at, total) in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        f"delays scaled x{SCALE} (1.0 s -> 100 ms, 0.5 s -> 50 ms). " + per_loop_evidence(parts),
        {
            "lines": {n: r[0] for n, r in runs.items()},
            "total_s": {n: r[2] for n, r in runs.items()},
        },
    )


@claim(
    "gather_all_results",
    claim="gather runs the coroutines concurrently, returns when all finish, results in order.",
    quote="Wait for multiple coroutines; return all results",
)
def gather_all_results() -> Outcome:
    delays = [0.01 * (8 - i) for i in range(8)]  # the first argument finishes last

    def run(name: LoopName) -> tuple[bool, bool, list[int], float]:
        finished: list[int] = []

        async def job(i: int) -> int:
            await asyncio.sleep(delays[i])
            finished.append(i)
            return i

        async def main() -> tuple[list[int], bool, float]:
            start = time.monotonic()
            results = await asyncio.gather(*(job(i) for i in range(len(delays))))
            return results, len(finished) == len(delays), time.monotonic() - start

        results, all_done, took = run_on(name, main)
        return results == list(range(len(delays))), all_done, finished, took

    runs = per_loop(run)
    longest, total = max(delays), sum(delays)
    checks: dict[str, bool] = {}
    parts: dict[LoopName, str] = {}
    for name, (in_order, all_done, finished, took) in runs.items():
        checks[f"{name} results in argument order"] = in_order
        checks[f"{name} all finished on return"] = all_done
        checks[f"{name} concurrent"] = took < (longest + total) / 2
        parts[name] = (
            f"took {ms(took)} (longest {ms(longest)}, sum {ms(total)}); finished in order "
            f"{finished}, results returned in argument order: {in_order}"
        )
    return Outcome(verdict_of(checks), per_loop_evidence(parts), {"checks": checks})


def _polls_until_run(name: LoopName, schedule: str) -> tuple[bool, list[int], bool]:
    """Schedule three callbacks (or tasks) from a running coroutine; count polls until each runs.

    Returns (ran synchronously inside the scheduling call, polls between, FIFO order kept).
    """
    polls = 0

    def on_poll(_timeout: float | None) -> None:
        nonlocal polls
        polls += 1

    ran: list[tuple[int, int]] = []

    def record(i: int) -> None:
        ran.append((i, polls))

    async def step(i: int) -> None:
        record(i)

    async def main() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # start from an ordinary step, not the first one
        before = polls
        tasks = []
        for i in range(3):
            if schedule == "create_task":
                tasks.append(asyncio.create_task(step(i)))
            else:
                loop.call_soon(record, i)
        inline = bool(ran)
        if tasks:
            await asyncio.gather(*tasks)
        else:
            done = loop.create_future()
            loop.call_soon(done.set_result, None)
            await done
        return inline, before

    with polled_loop(name, on_poll) as loop:
        inline, before = loop.run_until_complete(asyncio.wait_for(main(), 5))
    return inline, [at - before for _, at in ran], [i for i, _ in ran] == [0, 1, 2]


def _next_iteration_outcome(schedule: str) -> Outcome:
    runs = per_loop(lambda name: _polls_until_run(name, schedule))
    checks: dict[str, bool] = {}
    parts: dict[LoopName, str] = {}
    for name, (inline, polls, fifo) in runs.items():
        checks[f"{name} not run inline"] = not inline
        checks[f"{name} after exactly one poll"] = polls == [1, 1, 1]
        parts[name] = (
            f"ran inside {schedule}(): {inline}; I/O polls between scheduling and running: "
            f"{polls}; FIFO: {fifo}"
        )
    return Outcome(verdict_of(checks), per_loop_evidence(parts), {"checks": checks})


@claim(
    "create_task_next_iteration",
    claim="create_task does not start the coroutine; its first step runs on the next iteration.",
    quote="asyncio.create_task(coro)Schedule a coroutine to run concurrentlyNext loop iteration",
)
def create_task_next_iteration() -> Outcome:
    return _next_iteration_outcome("create_task")


@claim(
    "call_soon_next_iteration",
    claim="call_soon runs the callback on the next loop iteration, in FIFO order.",
    quote="loop.call_soon(callback, *args)Run a callback ASAP (non-async function)Next iteration",
)
def call_soon_next_iteration() -> Outcome:
    return _next_iteration_outcome("call_soon")


def _timer_errors(name: LoopName, absolute: bool) -> list[float]:
    """Run 200 timers; return how late each ran by the clock it is judged by (negative = early).

    call_later is judged by time.monotonic(); call_at by the loop's own clock, as the article says.
    Each delay is a whole number of ms plus 0.45 ms: where millisecond rounding would show.
    """
    delays = [(k % 20 + 1.45) / 1000 for k in range(200)]

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[float]] = []

        def by_loop_clock(fut: asyncio.Future[float], when: float) -> None:
            fut.set_result(loop.time() - when)

        def by_monotonic(fut: asyncio.Future[float], due: float) -> None:
            fut.set_result(time.monotonic() - due)

        for delay in delays:
            fut: asyncio.Future[float] = loop.create_future()
            if absolute:
                when = loop.time() + delay
                loop.call_at(when, by_loop_clock, fut, when)
            else:
                loop.call_later(delay, by_monotonic, fut, time.monotonic() + delay)
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    return run_on(name, main)


def _timer_outcome(absolute: bool) -> Outcome:
    runs = per_loop(lambda name: _timer_errors(name, absolute))
    tolerance = 0.0001  # below clock-reading noise
    clock = "loop.time()" if absolute else "time.monotonic()"
    checks = {name: all(e >= -tolerance for e in errors) for name, errors in runs.items()}
    parts = {
        name: (
            f"{sum(e < -tolerance for e in errors)}/{len(errors)} ran early"
            + (f" (by up to {ms(-min(errors))})" if min(errors) < -tolerance else "")
            + f", lateness median {ms(statistics.median(errors))}, max {ms(max(errors))}"
        )
        for name, errors in runs.items()
    }
    note = (
        "; uvloop rounds each delay to whole milliseconds on libuv's millisecond clock"
        if not checks.get("uvloop", True)
        else ""
    )
    return Outcome(
        verdict_of(checks),
        f"200 timers, delays 1.45-20.45 ms, judged by {clock}: " + per_loop_evidence(parts) + note,
        {"early": {n: sum(e < -tolerance for e in errs) for n, errs in runs.items()}},
    )


@claim(
    "call_later_after_delay",
    claim="A call_later callback runs only after the delay has passed.",
    quote="loop.call_later(delay, callback, *args)Run a callback after a delayAfter specified time",
)
def call_later_after_delay() -> Outcome:
    return _timer_outcome(absolute=False)


@claim(
    "call_at_loop_time",
    claim="A call_at callback runs at (not before) the given loop time.",
    quote="loop.call_at(when, callback, *args)Run a callback at an absolute timeAt specified loop "
    "time",
)
def call_at_loop_time() -> Outcome:
    return _timer_outcome(absolute=True)


@claim(
    "loop_time_since_start",
    claim="loop.time() counts seconds since the loop started.",
    quote="Current time in loop's internal clock (seconds since loop start)",
)
def loop_time_since_start() -> Outcome:
    def read(name: LoopName) -> tuple[float, float]:
        with closing(new_event_loop(name)) as loop:
            return loop.time(), time.monotonic()

    runs = per_loop(read)
    # A clock that starts with the loop reads ~0 right after the loop is created.
    checks = {name: abs(loop_t) < 1.0 for name, (loop_t, _) in runs.items()}
    parts = {
        name: f"loop.time() = {loop_t:.3f} s on a just-created loop; time.monotonic() - loop.time()"
        f" = {(mono - loop_t) * 1000:.3f} ms"
        for name, (loop_t, mono) in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts) + " -- loop.time() is the monotonic clock (epoch ~ boot), "
        "not seconds since loop start",
        {"loop_time": {n: r[0] for n, r in runs.items()}},
    )


def _callback_order(name: LoopName) -> list[str]:
    """Make a socket readable, a timer due and a call_soon pending at once; log what runs first."""
    log: list[str] = []
    armed = False
    labels = {"call_soon", "I/O", "call_later(1 ms)", "call_later(0)"}

    def on_poll(_timeout: float | None) -> None:
        if armed and (not log or log[-1] != "poll"):
            log.append("poll")

    loop_cm = polled_loop(name, on_poll) if name == "asyncio" else closing(new_event_loop(name))
    reader, writer = socket.socketpair()
    with loop_cm as loop, reader, writer:
        done: asyncio.Future[None] = loop.create_future()

        def seen(label: str) -> None:
            nonlocal armed
            log.append(label)
            if labels <= set(log) and not done.done():
                armed = False
                done.set_result(None)

        def on_readable() -> None:
            reader.recv(16)
            loop.remove_reader(reader.fileno())
            seen("I/O")

        def kick() -> None:
            nonlocal armed
            writer.send(b"x")
            loop.add_reader(reader.fileno(), on_readable)
            loop.call_later(0.001, seen, "call_later(1 ms)")
            loop.call_later(0, seen, "call_later(0)")
            loop.call_soon(seen, "call_soon")
            armed = True
            time.sleep(0.005)  # hold the loop until the timer is due and the socket readable

        loop.call_soon(kick)
        loop.run_until_complete(asyncio.wait_for(done, 5))
    return log


@claim(
    "soon_before_io_later_after",
    claim="call_soon callbacks run before I/O callbacks; call_later timers are handled after I/O.",
    quote="Callbacks scheduled with call_soon() run before I/O polling, while call_later() "
    "callbacks are checked after I/O.",
)
def soon_before_io_later_after() -> Outcome:
    runs = per_loop(_callback_order)

    def holds(log: list[str]) -> bool:
        return log.index("call_soon") < log.index("I/O") < log.index("call_later(1 ms)")

    checks = {name: holds(log) for name, log in runs.items()}
    parts = {name: " -> ".join(log) for name, log in runs.items()}
    return Outcome(
        verdict_of(checks),
        "socket made readable, a 1 ms timer made due, call_soon pending, all at once: "
        + per_loop_evidence(parts)
        + " (asyncio polls first -- with timeout 0, as callbacks are ready -- then runs the "
        "call_soon callbacks, then I/O callbacks, then due timers; libuv runs I/O callbacks "
        "inside its poll phase and timers at the start of the next iteration, and uvloop turns "
        "call_later(0) into call_soon)",
        {"order": runs},
    )


@claim(
    "single_threaded",
    claim="Only one callback runs at a time, all on the loop's one thread.",
    quote="The event loop's key property is single-threaded execution: only one callback runs "
    "at a time.",
)
def single_threaded() -> Outcome:
    def run(name: LoopName) -> tuple[int, int, bool]:
        async def main() -> tuple[int, int, bool]:
            active = max_active = 0
            threads: set[int] = set()

            async def worker() -> None:
                nonlocal active, max_active
                for _ in range(20):
                    active += 1
                    max_active = max(max_active, active)
                    threads.add(threading.get_ident())
                    sum(range(2000))  # a stretch of work: a window for any overlap to show
                    active -= 1
                    await asyncio.sleep(0)

            await asyncio.gather(*(worker() for _ in range(100)))
            loop = asyncio.get_running_loop()
            other = await loop.run_in_executor(None, threading.get_ident)
            return max_active, len(threads), other != threading.get_ident()

        return run_on(name, main)

    runs = per_loop(run)
    checks = {n: peak == 1 and nthreads == 1 for n, (peak, nthreads, _) in runs.items()}
    parts = {
        n: f"2000 steps of 100 tasks: at most {peak} running at once, on {nthreads} thread(s); "
        f"run_in_executor work ran on another thread: {other}"
        for n, (peak, nthreads, other) in runs.items()
    }
    return Outcome(verdict_of(checks), per_loop_evidence(parts), {"runs": runs})


@claim(
    "switch_only_at_await",
    claim="Tasks switch only at await points, never in the middle of synchronous code.",
    quote="Task switching happens at await points, never mid-function.",
)
def switch_only_at_await() -> Outcome:
    def run(name: LoopName) -> tuple[list[int], int]:
        async def main() -> list[str]:
            log: list[str] = []

            async def returns_at_once() -> None:
                return None

            async def worker(label: str) -> None:
                for _ in range(5):
                    log.extend(label * 200)
                    for _ in range(50):
                        await returns_at_once()  # an await that never suspends
                    log.extend(label * 200)
                    await asyncio.sleep(0)  # an await that does

            await asyncio.gather(*(worker(label) for label in "abc"))
            return log

        log = run_on(name, main)
        runs = [len(list(group)) for _, group in itertools.groupby(log)]
        return runs, len(runs) - 1

    runs = per_loop(run)
    # Each round (400 appends around 50 non-suspending awaits) must be one uninterrupted run.
    checks = {n: all(r == 400 for r in lengths) for n, (lengths, _) in runs.items()}
    parts = {
        n: f"3 tasks x 5 rounds gave {len(lengths)} uninterrupted runs "
        f"(sizes {sorted(set(lengths))}); {switches} switches, all at await asyncio.sleep(0); "
        f"750 awaits of a coroutine that returns at once switched 0 times"
        if checks[n]
        else f"runs {lengths}"
        for n, (lengths, switches) in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts) + " (await is where a switch can happen, not where one must)",
        {"runs": {n: r[0] for n, r in runs.items()}},
    )


@claim(
    "eliminates_race_conditions",
    claim="Cooperative scheduling eliminates race conditions.",
    quote="This eliminates race conditions but requires careful design to prevent blocking.",
)
def eliminates_race_conditions() -> Outcome:
    n = 100

    def run(name: LoopName) -> tuple[int, int]:
        async def main() -> tuple[int, int]:
            counter = 0

            async def read_await_write() -> None:
                nonlocal counter
                value = counter
                await asyncio.sleep(0)  # another task may run here and update counter
                counter = value + 1

            async def read_write_await() -> None:
                nonlocal counter
                value = counter
                counter = value + 1
                await asyncio.sleep(0)

            await asyncio.gather(*(read_await_write() for _ in range(n)))
            across = counter
            counter = 0
            await asyncio.gather(*(read_write_await() for _ in range(n)))
            return n - across, n - counter

        return run_on(name, main)

    runs = per_loop(run)
    checks: dict[str, bool] = {}
    for name, (lost_across, lost_sync) in runs.items():
        checks[f"{name} no lost update without await"] = lost_sync == 0
        checks[f"{name} no lost update across await"] = lost_across == 0
    parts = {
        name: f"{n} tasks doing read -> await -> write lost {lost_across}/{n} increments; "
        f"with no await between read and write lost {lost_sync}/{n}"
        for name, (lost_across, lost_sync) in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts) + " -- no data races inside a step, but logical races across "
        "an await remain",
        {"lost": runs},
    )


@claim(
    "asyncio_run_fresh_loop",
    claim="asyncio.run creates a fresh loop, runs the coroutine, then cleans up and closes it.",
    quote="By default, asyncio.run(coro) creates a fresh event loop, runs the coroutine, and "
    "closes the loop.",
)
def asyncio_run_fresh_loop() -> Outcome:
    loops: list[asyncio.AbstractEventLoop] = []
    finalised: list[bool] = []

    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            finalised.append(True)

    async def main() -> asyncio.Task[None]:
        loops.append(asyncio.get_running_loop())
        leftover = asyncio.create_task(asyncio.sleep(3600))
        gen = agen()
        await gen.__anext__()  # left suspended: asyncio.run must finalise it
        return leftover

    first = asyncio.run(main())
    second = asyncio.run(main())
    checks = {
        "fresh loop each call": loops[0] is not loops[1],
        "loop closed afterwards": all(loop.is_closed() for loop in loops),
        "leftover tasks cancelled": first.cancelled() and second.cancelled(),
        "async generators finalised": finalised == [True, True],
    }
    evidence = ", ".join(f"{k}: {v}" for k, v in checks.items())
    return Outcome(verdict_of(checks), f"two asyncio.run calls: {evidence}", {"checks": checks})


@claim(
    "loop_stop_finishes_iteration",
    claim="loop.stop() lets the current iteration finish, then halts (tasks stay pending).",
    quote="Call loop.stop() to finish the current iteration and halt execution",
)
def loop_stop_finishes_iteration() -> Outcome:
    def run(name: LoopName) -> tuple[list[str], bool]:
        with closing(new_event_loop(name)) as loop:
            log: list[str] = []
            pending = loop.create_task(asyncio.sleep(3600))

            def first() -> None:
                log.append("same-batch #1 (calls stop)")
                loop.call_soon(log.append, "scheduled before stop()")
                loop.stop()
                loop.call_soon(log.append, "scheduled after stop()")

            loop.call_soon(first)
            loop.call_soon(log.append, "same-batch #2")
            safety = loop.call_later(5, loop.stop)  # bounded even if stop() were ignored
            loop.run_forever()
            safety.cancel()
            halted = list(log)
            still_pending = not pending.done()
            pending.cancel()
            loop.run_until_complete(asyncio.gather(pending, return_exceptions=True))
            return halted, still_pending

    runs = per_loop(run)
    checks: dict[str, bool] = {}
    for name, (log, still_pending) in runs.items():
        checks[f"{name} current batch finished"] = "same-batch #2" in log
        checks[f"{name} halted right after"] = not any(e.startswith("scheduled") for e in log)
        checks[f"{name} task left pending"] = still_pending
    parts = {
        name: f"ran {log}; a sleeping task was left pending: {still_pending}"
        for name, (log, still_pending) in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts) + " (uvloop's stop() is itself a queued callback, so one "
        "more batch runs)",
        {"checks": checks},
    )


@claim(
    "cancel_with_cancellederror",
    claim="You stop a specific task by using asyncio.CancelledError.",
    quote="or use asyncio.CancelledError to stop specific tasks",
)
def cancel_with_cancellederror() -> Outcome:
    def run(name: LoopName) -> dict[str, bool]:
        async def main() -> dict[str, bool]:
            ticked = asyncio.Event()
            seen: list[str] = []

            async def target() -> None:
                try:
                    while True:
                        ticked.set()
                        await asyncio.sleep(0.001)
                except asyncio.CancelledError as exc:
                    seen.append(type(exc).__name__)
                    raise

            task = asyncio.create_task(target())
            await ticked.wait()
            try:  # "using" the exception outside the task: raise and handle it here
                raise asyncio.CancelledError
            except asyncio.CancelledError:
                pass
            ticked.clear()
            await ticked.wait()  # the target ticks on: nothing stopped it
            survived = not task.done()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

            async def stops_itself() -> None:
                raise asyncio.CancelledError

            own = asyncio.create_task(stops_itself())
            await asyncio.gather(own, return_exceptions=True)
            return {
                "raising it outside left the task running": survived,
                "task.cancel() stopped it": task.cancelled(),
                "CancelledError arrived inside the task": seen == ["CancelledError"],
                "raising it inside a task ends that task": own.cancelled(),
            }

        return run_on(name, main)

    runs = per_loop(run)
    checks: dict[str, bool] = {}
    for name, facts in runs.items():
        checks[f"{name} CancelledError is the stop signal"] = (
            facts["task.cancel() stopped it"] and facts["CancelledError arrived inside the task"]
        )
        checks[f"{name} raising it stops another task"] = not facts[
            "raising it outside left the task running"
        ]
    parts = {name: ", ".join(f"{k}: {v}" for k, v in facts.items()) for name, facts in runs.items()}
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts) + " -- the call is task.cancel(); CancelledError is what it "
        "delivers",
        {"facts": runs},
    )
