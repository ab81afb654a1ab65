"""Claims from the FAQ about asyncio debug mode."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager

from app.claims.probes import per_loop
from app.claims.registry import Outcome, claim, verdict_of
from app.loops import LoopName, new_event_loop


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _asyncio_log() -> Iterator[list[str]]:
    """Everything the 'asyncio' logger says meanwhile, kept off stderr."""
    logger = logging.getLogger("asyncio")
    handler = _Collect()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@claim(
    "policy_set_debug",
    claim="asyncio.get_event_loop_policy().set_debug(True) turns on asyncio debug mode.",
    quote="Use asyncio.get_event_loop_policy().set_debug(True) to enable asyncio debug mode",
)
def policy_set_debug() -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # report a deprecation as evidence, not as an error
        try:
            asyncio.get_event_loop_policy().set_debug(True)  # type: ignore[attr-defined]
            raised = ""
        except Exception as exc:
            raised = f"{type(exc).__name__}: {exc}"
    with closing(asyncio.new_event_loop()) as loop:
        debug_after = loop.get_debug()
    checks = {"the call works": not raised, "a new loop is in debug mode": debug_after}
    warned = "; ".join(f"{w.category.__name__}: {w.message}" for w in caught)
    return Outcome(
        verdict_of(checks),
        (f"raised {raised}" if raised else "returned without error")
        + (f"; warned {warned}" if warned else "; no warning")
        + f"; a new loop's get_debug() afterwards: {debug_after}. What works: "
        "asyncio.run(main(), debug=True), loop.set_debug(True), PYTHONASYNCIODEBUG=1, "
        "python -X dev",
        {"raised": raised, "debug_after": debug_after},
    )


@claim(
    "debug_mode_logs",
    claim="Debug mode logs long-running callbacks and context switches.",
    quote="which logs long-running callbacks and context switches.",
)
def debug_mode_logs() -> Outcome:
    switches = 50

    def run(name: LoopName) -> tuple[list[str], list[str]]:
        async def main() -> None:
            time.sleep(0.05)  # one slow step, over the 20 ms threshold set below
            for _ in range(switches):
                await asyncio.sleep(0)

        with _asyncio_log() as messages, closing(new_event_loop(name)) as loop:
            loop.set_debug(True)
            loop.slow_callback_duration = 0.02
            start = len(messages)  # skip what creating the loop logged
            loop.run_until_complete(main())
            logged = messages[start:]
        slow = [m for m in logged if "took" in m]
        return slow, [m for m in logged if m not in slow]

    runs = per_loop(run)
    checks: dict[str, bool] = {}
    for name, (slow, other) in runs.items():
        checks[f"{name} logs slow callbacks"] = len(slow) >= 1
        checks[f"{name} logs context switches"] = len(other) >= switches
    parts = "; ".join(
        f"{name}: {len(slow)} slow-callback record(s) ('Executing <Task ...> "
        f"{slow[0].rsplit('> ', 1)[-1]}'), {len(other)} other "
        f"records for {switches} task switches"
        if slow
        else f"{name}: no slow-callback record, {len(other)} other records"
        for name, (slow, other) in runs.items()
    )
    return Outcome(
        verdict_of(checks),
        "debug mode with slow_callback_duration = 20 ms, one 50 ms step: " + parts,
        {
            "slow": {n: len(r[0]) for n, r in runs.items()},
            "other": {n: len(r[1]) for n, r in runs.items()},
        },
    )
