"""`/threadsafe`: a worker thread hands a coroutine to the loop with run_coroutine_threadsafe.

The loop is not thread-safe; run_coroutine_threadsafe is the sanctioned door in. The worker blocks
on the returned concurrent.futures.Future while the coroutine runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import threading
from time import perf_counter
from typing import Any

from aiohttp import web

from app.keys import EXECUTORS
from app.params import delay_param
from app.responses import demo_response

routes = web.RouteTableDef()


async def _on_loop(delay: float) -> str:
    await asyncio.sleep(delay)
    return threading.current_thread().name


def _worker(loop: asyncio.AbstractEventLoop, delay: float) -> dict[str, Any]:
    started = perf_counter()
    future = asyncio.run_coroutine_threadsafe(_on_loop(delay), loop)
    ran_on = future.result(timeout=delay + 30)
    return {
        "worker_thread": threading.current_thread().name,
        "coroutine_thread": ran_on,
        "worker_waited_s": round(perf_counter() - started, 6),
    }


@routes.get("/threadsafe")
async def threadsafe_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    delay = delay_param(request, default=0.1)
    loop = asyncio.get_running_loop()
    info = await request.app[EXECUTORS].thread.run(_worker, loop, delay)
    return demo_response(
        request,
        "threadsafe",
        started,
        delay=delay,
        loop_thread=threading.current_thread().name,
        **info,
    )
