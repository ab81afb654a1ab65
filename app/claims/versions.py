"""Claims whose truth depends on the interpreter: eager tasks (3.12+), a loop outside a loop.

Each experiment says which Python it ran on, so `loop-lab matrix` can set the answers side by side.
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
from typing import Any

from app.claims.probes import per_loop, run_on
from app.claims.registry import Outcome, claim, verdict_of
from app.loops import LoopName

PYTHON = platform.python_version()


@claim(
    "create_task_eager",
    claim="create_task defers the coroutine to the next iteration even with "
    "asyncio.eager_task_factory installed.",
    quote="asyncio.create_task(coro)Schedule a coroutine to run concurrentlyNext loop iteration",
)
def create_task_eager() -> Outcome:
    factory = getattr(asyncio, "eager_task_factory", None)
    if factory is None:
        return Outcome(
            "true",
            f"Python {PYTHON} has no asyncio.eager_task_factory (it came in 3.12): "
            "create_task always defers the first step",
            {"python": PYTHON, "eager": None},
        )

    def run(name: LoopName) -> str:
        async def main() -> str:
            loop = asyncio.get_running_loop()
            loop.set_task_factory(factory)
            ran: list[str] = []

            async def step() -> None:
                ran.append("first step")

            coro = step()
            try:
                task = asyncio.create_task(coro)
            except Exception as exc:  # uvloop on 3.13 passes the factory an argument it lacks
                coro.close()  # never scheduled: close it, or it warns "never awaited" when freed
                return f"create_task() raised {type(exc).__name__}: {exc}"
            finally:
                loop.set_task_factory(None)
            inline = bool(ran)  # the first step already ran inside create_task
            await task
            return "ran inside create_task()" if inline else "deferred to the next iteration"

        return run_on(name, main)

    runs = per_loop(run)
    checks = {f"{name} deferred": what.startswith("deferred") for name, what in runs.items()}
    parts = "; ".join(f"{name}: {what}" for name, what in runs.items())
    return Outcome(
        verdict_of(checks),
        f"Python {PYTHON}, loop.set_task_factory(asyncio.eager_task_factory), first step: {parts}",
        {"python": PYTHON, "eager": runs},
    )


# Runs in a fresh interpreter: the question is what a script's first call does, with no loop yet.
_FRESH_SCRIPT = """
import asyncio, json, warnings
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        loop = asyncio.get_event_loop()
        out["get_event_loop"] = "returned " + type(loop).__name__
        loop.close()
    except Exception as exc:
        out["get_event_loop"] = "raised %s: %s" % (type(exc).__name__, exc)
    out["get_event_loop_warnings"] = ["%s: %s" % (w.category.__name__, w.message) for w in caught]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    out["set_event_loop_warnings"] = ["%s: %s" % (w.category.__name__, w.message) for w in caught]
print(json.dumps(out))
"""


def _fresh_interpreter() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@claim(
    "get_event_loop_outside",
    claim="Outside a running loop, a script can get a loop to control directly: "
    "asyncio.get_event_loop() returns one, and the article's new_event_loop() + "
    "set_event_loop() runs without a warning.",
    quote="For advanced control, you can access the loop directly.",
)
def get_event_loop_outside() -> Outcome:
    seen = _fresh_interpreter()
    got = str(seen["get_event_loop"])
    warned: list[str] = seen["get_event_loop_warnings"]
    set_warned: list[str] = seen["set_event_loop_warnings"]
    checks = {
        "get_event_loop() returns a loop": got.startswith("returned"),
        "get_event_loop() does not warn": not warned,
        "new_event_loop() + set_event_loop() do not warn": not set_warned,
    }
    return Outcome(
        verdict_of(checks),
        f"Python {PYTHON}, a fresh script's first call: asyncio.get_event_loop() {got}"
        + (f", warning {'; '.join(warned)}" if warned else ", no warning")
        + "; the article's new_event_loop() + set_event_loop(): "
        + ("warned " + "; ".join(set_warned) if set_warned else "no warning")
        + ". What always works: asyncio.run(), or asyncio.Runner for several calls on one loop",
        {"python": PYTHON, **seen},
    )
