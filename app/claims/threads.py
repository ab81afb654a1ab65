"""Claims about loops and threads: asyncio.run in a thread, thread-safety, one loop per thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from contextlib import closing

from app.claims.probes import loop_in_thread, ms, per_loop, run_on, wait_until_polling
from app.claims.registry import Outcome, claim, per_loop_evidence, verdict_of
from app.loops import LoopName, loop_factory, new_event_loop

ALREADY_RUNNING = "This event loop is already running"


def _raised(fn: Callable[[], object]) -> str:
    """Call fn; describe what it returned or the exception it raised."""
    try:
        return f"returned {fn()!r}"
    except Exception as exc:
        return f"{type(exc).__name__}({str(exc)!r})"


@claim(
    "asyncio_run_in_thread_raises",
    claim="asyncio.run() in another thread raises 'RuntimeError: This event loop is already "
    "running'.",
    quote='This raises "RuntimeError: This event loop is already running"',
)
def asyncio_run_in_thread_raises() -> Outcome:
    def run(name: LoopName) -> tuple[str, str]:
        async def async_task() -> str:
            await asyncio.sleep(0.01)
            return "done"

        def in_thread(main_loop: asyncio.AbstractEventLoop) -> tuple[str, str]:
            def run_fresh() -> str:
                if name == "asyncio":
                    return asyncio.run(async_task())  # exactly the article's call
                with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
                    return runner.run(async_task())

            fresh = _raised(run_fresh)
            # What does raise the quoted error: driving the loop that is already running. A bare
            # future, not a coroutine: uvloop wraps a coroutine in a task before it checks.
            never: asyncio.Future[None] = asyncio.Future(loop=main_loop)
            busy = _raised(lambda: main_loop.run_until_complete(never))
            return fresh, busy

        async def main() -> tuple[str, str]:
            return await asyncio.to_thread(in_thread, asyncio.get_running_loop())

        return run_on(name, main)

    runs = per_loop(run)
    checks = {
        name: fresh.startswith("RuntimeError") and ALREADY_RUNNING.lower() in fresh.lower()
        for name, (fresh, _) in runs.items()
    }
    parts = {
        name: f"while the main loop ran, a worker thread's "
        f"{'asyncio.run' if name == 'asyncio' else 'asyncio.Runner(uvloop)'}(async_task()) "
        f"{fresh} (its own fresh loop); main_loop.run_until_complete() from that thread {busy}"
        for name, (fresh, busy) in runs.items()
    }
    return Outcome(verdict_of(checks), per_loop_evidence(parts), {"results": runs})


@claim(
    "run_coroutine_threadsafe_future",
    claim="run_coroutine_threadsafe queues a coroutine on the loop and returns a "
    "concurrent.futures.Future the calling thread can wait on.",
    quote="it queues the coroutine safely and returns a concurrent.futures.Future that you can "
    "wait on from the calling thread.",
)
def run_coroutine_threadsafe_future() -> Outcome:
    async def whoami() -> int:
        return threading.get_ident()

    def running(name: LoopName) -> tuple[bool, bool, float]:
        with loop_in_thread(name) as (loop, _):
            start = time.monotonic()
            future = asyncio.run_coroutine_threadsafe(whoami(), loop)
            ident = future.result(timeout=5)
            took = time.monotonic() - start
            is_cf = isinstance(future, concurrent.futures.Future)
            return is_cf, ident != threading.get_ident(), took

    def not_yet_running(name: LoopName) -> bool:
        # The article's second example: submit from a thread, then start the loop.
        with closing(new_event_loop(name)) as loop:
            arrived = asyncio.Event()
            submitted = threading.Event()
            result: list[int] = []

            async def safe_async() -> int:
                arrived.set()
                return threading.get_ident()

            def worker() -> None:
                future = asyncio.run_coroutine_threadsafe(safe_async(), loop)
                submitted.set()
                result.append(future.result(timeout=5))

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                done = pool.submit(worker)
                submitted.wait(5)
                loop.run_until_complete(asyncio.wait_for(arrived.wait(), 5))
                done.result(timeout=5)  # re-raises anything the worker hit
            return result == [threading.get_ident()]

    runs = per_loop(lambda name: (running(name), not_yet_running(name)))
    checks: dict[str, bool] = {}
    parts: dict[LoopName, str] = {}
    for name, ((is_cf, on_loop_thread, took), early_ok) in runs.items():
        checks[f"{name} returns concurrent.futures.Future"] = is_cf
        checks[f"{name} ran on the loop thread"] = on_loop_thread
        checks[f"{name} submitted before the loop ran"] = early_ok
        parts[name] = (
            f"returned a concurrent.futures.Future: {is_cf}; result() in the calling thread "
            f"after {ms(took)}; coroutine ran on the loop's thread: {on_loop_thread}; "
            f"submitted before the loop started, delivered once it ran: {early_ok}"
        )
    return Outcome(verdict_of(checks), per_loop_evidence(parts), {"checks": checks})


def _wake_latency(
    loop: asyncio.AbstractEventLoop, native_id: int, schedule: str, backstop: float
) -> tuple[float, bool]:
    """Latency from a foreign thread's call to the callback running, while the loop sleeps.

    The loop is given one timer `backstop` seconds out, so it sleeps in the poll with that timeout.
    """
    armed = threading.Event()
    ran: concurrent.futures.Future[float] = concurrent.futures.Future()

    def arm() -> None:
        loop.call_later(backstop, lambda: None)
        armed.set()

    loop.call_soon_threadsafe(arm)
    armed.wait(5)
    asleep = wait_until_polling(native_id)
    start = time.monotonic()
    if schedule == "call_soon":
        loop.call_soon(lambda: ran.set_result(time.monotonic()))
    else:
        loop.call_soon_threadsafe(lambda: ran.set_result(time.monotonic()))
    return ran.result(timeout=backstop + 5) - start, asleep


@claim(
    "loop_not_thread_safe",
    claim="The loop is not thread-safe: from another thread only the *_threadsafe calls work.",
    quote="The event loop is not thread-safe; use asyncio.run_coroutine_threadsafe() to schedule "
    "work from other threads.",
)
def loop_not_thread_safe() -> Outcome:
    backstop = 0.25

    def run(name: LoopName) -> tuple[float, float, bool, str]:
        with loop_in_thread(name) as (loop, native_id):
            unsafe, asleep = _wake_latency(loop, native_id, "call_soon", backstop)
            safe, _ = _wake_latency(loop, native_id, "call_soon_threadsafe", backstop)
            debug_on: concurrent.futures.Future[None] = concurrent.futures.Future()

            def turn_debug_on() -> None:
                loop.set_debug(True)
                debug_on.set_result(None)

            loop.call_soon_threadsafe(turn_debug_on)
            debug_on.result(timeout=5)
            in_debug = _raised(lambda: loop.call_soon(lambda: None))
            loop.call_soon_threadsafe(loop.set_debug, False)
            return unsafe, safe, asleep, in_debug

    runs = per_loop(run)
    checks: dict[str, bool] = {}
    parts: dict[LoopName, str] = {}
    for name, (unsafe, safe, asleep, in_debug) in runs.items():
        checks[f"{name} plain call_soon does not wake the loop"] = unsafe > backstop / 2
        checks[f"{name} call_soon_threadsafe wakes it"] = safe < 0.05
        parts[name] = (
            f"loop asleep in the poll (seen in /proc: {asleep}) with a {ms(backstop)} timer "
            f"pending: call_soon from another thread ran after {ms(unsafe)}, "
            f"call_soon_threadsafe after {ms(safe)}; in debug mode call_soon from another "
            f"thread {in_debug}"
        )
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts),
        {"latency_s": {n: {"call_soon": r[0], "threadsafe": r[1]} for n, r in runs.items()}},
    )


@claim(
    "cross_thread_requires_rct",
    claim="Cross-thread communication requires run_coroutine_threadsafe().",
    quote="Cross-thread communication requires run_coroutine_threadsafe().",
)
def cross_thread_requires_rct() -> Outcome:
    async def echo(value: str) -> str:
        return value

    def run(name: LoopName) -> dict[str, float]:
        took: dict[str, float] = {}
        with loop_in_thread(name) as (loop, _):
            start = time.monotonic()
            asyncio.run_coroutine_threadsafe(echo("rct"), loop).result(timeout=5)
            took["run_coroutine_threadsafe"] = time.monotonic() - start

            # call_soon_threadsafe resolving an asyncio future the loop awaits
            waiting: concurrent.futures.Future[asyncio.Future[str]] = concurrent.futures.Future()

            async def await_value() -> str:
                fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                waiting.set_result(fut)
                return await fut

            got = asyncio.run_coroutine_threadsafe(await_value(), loop)
            fut = waiting.result(timeout=5)
            start = time.monotonic()
            loop.call_soon_threadsafe(fut.set_result, "call_soon_threadsafe")
            got.result(timeout=5)
            took["call_soon_threadsafe"] = time.monotonic() - start

            # a plain concurrent.futures.Future completed by this thread, awaited via wrap_future
            plain: concurrent.futures.Future[str] = concurrent.futures.Future()
            wrapped_ready = threading.Event()

            async def await_plain() -> str:
                wrapped = asyncio.wrap_future(plain)
                wrapped_ready.set()
                return await wrapped

            got2 = asyncio.run_coroutine_threadsafe(await_plain(), loop)
            wrapped_ready.wait(5)
            start = time.monotonic()
            plain.set_result("wrap_future")
            got2.result(timeout=5)
            took["wrap_future"] = time.monotonic() - start
        return took

    runs = per_loop(run)
    checks: dict[str, bool] = {}
    for name, took in runs.items():
        checks[f"{name} run_coroutine_threadsafe works"] = "run_coroutine_threadsafe" in took
        checks[f"{name} nothing else works"] = set(took) == {"run_coroutine_threadsafe"}
    parts = {
        name: "delivered across threads by " + ", ".join(f"{k} ({ms(v)})" for k, v in took.items())
        for name, took in runs.items()
    }
    return Outcome(
        verdict_of(checks),
        per_loop_evidence(parts)
        + " -- a thread-safe entry is required, run_coroutine_threadsafe is one "
        "of several",
        {"took_s": runs},
    )


@claim(
    "one_loop_per_process",
    claim="A process cannot run several event loops at once; it has one loop per thread.",
    quote="Can I have multiple event loops running simultaneously? No. A Python process has one "
    "event loop per thread.",
)
def one_loop_per_process() -> Outcome:
    barrier = threading.Barrier(2, timeout=5)
    loops: dict[LoopName, asyncio.AbstractEventLoop] = {}
    both_running: list[bool] = []
    nested: dict[LoopName, str] = {}

    def in_thread(name: LoopName) -> None:
        async def main() -> None:
            loops[name] = asyncio.get_running_loop()
            barrier.wait()  # both loops are inside run_until_complete right now
            both_running.append(all(loop.is_running() for loop in loops.values()))
            barrier.wait()
            # A second loop in the same thread, while this one runs:
            with closing(new_event_loop(name)) as other:
                never: asyncio.Future[None] = asyncio.Future(loop=other)
                nested[name] = _raised(lambda: other.run_until_complete(never))

        run_on(name, main)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(in_thread, name) for name in ("asyncio", "uvloop")]:
            done.result(timeout=10)  # re-raises a broken barrier or anything else
    simultaneous = len(both_running) == 2 and all(both_running)
    checks = {
        "no two loops at once": not simultaneous,
        "one loop per thread": all(v.startswith("RuntimeError") for v in nested.values()),
    }
    return Outcome(
        verdict_of(checks),
        f"an asyncio loop and a uvloop loop in two threads were both running at the same instant: "
        f"{simultaneous} (each met a barrier from inside its running coroutine); starting a second "
        f"loop in a thread whose loop runs: "
        + "; ".join(f"{name}: {what}" for name, what in nested.items()),
        {"simultaneous": simultaneous, "nested": nested},
    )
