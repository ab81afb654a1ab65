"""Claims about the selector: how the loop waits, and where a sleeping coroutine's timer lives."""

from __future__ import annotations

import asyncio
import time
from contextlib import closing

from app.claims.probes import epoll_fds, epoll_watched, ms, per_loop, polled_loop, run_on
from app.claims.registry import Outcome, claim, per_loop_evidence, verdict_of
from app.loops import LoopName, new_event_loop

SLEEP = 0.1


def _select_timeouts(during: float) -> tuple[list[float | None], float]:
    """asyncio only: the timeouts select() was given while one coroutine slept, and CPU used."""
    timeouts: list[float | None] = []
    recording = False

    def on_poll(timeout: float | None) -> None:
        if recording:
            timeouts.append(timeout)

    async def main() -> float:
        nonlocal recording
        recording = True
        cpu = time.thread_time()
        await asyncio.sleep(during)
        recording = False
        return time.thread_time() - cpu

    with polled_loop("asyncio", on_poll) as loop:
        cpu = loop.run_until_complete(asyncio.wait_for(main(), 5))
    return timeouts, cpu


@claim(
    "selector_no_busy_wait",
    claim="The loop waits in the selector (epoll here) without busy-waiting.",
    quote="the event loop uses a selector (select, epoll, IOCP) to wait for I/O readiness without "
    "busy-waiting.",
)
def selector_no_busy_wait() -> Outcome:
    def cpu_while_sleeping(name: LoopName) -> float:
        async def main() -> float:
            cpu = time.thread_time()
            await asyncio.sleep(SLEEP)
            return time.thread_time() - cpu

        return run_on(name, main)

    runs = per_loop(cpu_while_sleeping)
    timeouts, _ = _select_timeouts(SLEEP)
    checks = {name: cpu < SLEEP / 10 for name, cpu in runs.items()}
    shown = ", ".join("None" if t is None else f"{t:.3f} s" for t in timeouts)
    parts = {
        name: f"the loop thread used {ms(cpu)} of CPU during a {ms(SLEEP)} await asyncio.sleep"
        for name, cpu in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts)
        + f" (asyncio: {len(timeouts)} select() call(s), timeouts {shown})",
        {"cpu_s": runs, "asyncio_select_timeouts": timeouts},
    )


@claim(
    "sleep_registers_timer_with_selector",
    claim="await asyncio.sleep() registers a timer with the selector.",
    quote="When you await asyncio.sleep(1), the event loop registers a timer with the selector, "
    "yields, and checks other ready tasks.",
)
def sleep_registers_timer_with_selector() -> Outcome:
    def watched(name: LoopName) -> tuple[int, int]:
        before = epoll_fds()
        with closing(new_event_loop(name)) as loop:
            mine = epoll_fds() - before  # the epoll instance(s) this loop created

            def count() -> int:
                return sum(epoll_watched(fd) for fd in mine)

            async def main() -> tuple[int, int]:
                # one full iteration first: uvloop adds its own fds to epoll at its first poll
                await asyncio.sleep(0)
                idle = count()
                sleeper = asyncio.ensure_future(asyncio.sleep(SLEEP))
                await asyncio.sleep(0)  # the sleeper has now armed its timer
                during = count()
                await sleeper
                return idle, during

            return loop.run_until_complete(asyncio.wait_for(main(), 5))

    runs = per_loop(watched)
    timeouts, _ = _select_timeouts(SLEEP)
    checks = {name: during > idle for name, (idle, during) in runs.items()}
    parts = {
        name: f"the loop's epoll set watched {idle} fd(s) before and {during} while a coroutine "
        f"slept"
        for name, (idle, during) in runs.items()
    }
    shown = ", ".join("None" if t is None else f"{t:.3f} s" for t in timeouts)
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts)
        + f" -- the timer stays in the loop's own heap and only bounds the "
        f"poll's timeout (asyncio passed select() timeout {shown})",
        {"watched": runs},
    )
