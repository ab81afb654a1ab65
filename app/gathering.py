"""`/gather`: n tasks created together and gathered; total time is the max delay, not the sum."""

from __future__ import annotations

import asyncio
from time import perf_counter

from aiohttp import web

from app.params import delay_param, int_param
from app.responses import demo_response

routes = web.RouteTableDef()

MAX_TASKS = 10_000


async def _sleeper(delay: float) -> float:
    await asyncio.sleep(delay)
    return delay


@routes.get("/gather")
async def gather_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    n = int_param(request, "n", default=10, lo=1, hi=MAX_TASKS)
    delay = delay_param(request, default=0.1)
    tasks = [asyncio.create_task(_sleeper(delay)) for _ in range(n)]
    results = await asyncio.gather(*tasks)
    return demo_response(
        request, "gather", started, n=n, delay=delay, sum_of_delays=round(sum(results), 6)
    )
