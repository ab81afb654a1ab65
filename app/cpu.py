"""`/cpu`: pure-Python CPU work inline, in a thread (still holds the GIL), or in a process."""

from __future__ import annotations

from time import perf_counter

from aiohttp import web

from app.executors import VIA
from app.keys import EXECUTORS
from app.params import choice_param, int_param
from app.policy import ensure_allowed
from app.responses import demo_response

routes = web.RouteTableDef()

MAX_UNITS = 20_000_000  # about a second or two of pure Python on a laptop core


def burn(units: int) -> int:
    """CPU-bound work that holds the GIL the whole time: a modular sum of squares."""
    total = 0
    for i in range(units):
        total = (total + i * i) % 1_000_003
    return total


@routes.get("/cpu")
async def cpu_handler(request: web.Request) -> web.Response:
    ensure_allowed(request, "burns CPU for seconds (inline it also blocks the event loop)")
    started = perf_counter()
    units = int_param(request, "n", default=1_000_000, lo=1, hi=MAX_UNITS)
    via = choice_param(request, "via", VIA, "inline")
    checksum = await request.app[EXECUTORS].run_via(via, burn, units)
    return demo_response(request, "cpu", started, n=units, via=via, checksum=checksum)
