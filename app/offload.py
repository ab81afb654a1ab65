"""`/offload`: the same blocking call moved off the loop with `run_in_executor`."""

from __future__ import annotations

import os
import threading
from time import perf_counter

from aiohttp import web

from app.executors import POOL_NAMES, worker_sleep
from app.keys import EXECUTORS
from app.params import choice_param, delay_param
from app.responses import demo_response

routes = web.RouteTableDef()


def blocking_sleep(delay: float) -> str:
    """Runs in a pool worker (thread or process), blocking it; says where it ran.

    Blocks like time.sleep, except that a shutting-down pool can wake it (see app.executors).
    """
    worker_sleep(delay)
    return f"pid {os.getpid()} thread {threading.current_thread().name}"


@routes.get("/offload")
async def offload_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    delay = delay_param(request, default=0.1)
    pool = choice_param(request, "pool", POOL_NAMES, "thread")
    ran_on = await request.app[EXECUTORS].pool(pool).run(blocking_sleep, delay)
    return demo_response(request, "offload", started, delay=delay, pool=pool, worker=ran_on)
