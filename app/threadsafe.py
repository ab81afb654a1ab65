"""`/threadsafe`: a worker thread hands a coroutine to the loop with run_coroutine_threadsafe.

The loop is not thread-safe; run_coroutine_threadsafe is the sanctioned door in. The worker blocks
on the returned concurrent.futures.Future while the coroutine runs on the loop thread.

That wait must end with the request: if the handler is cancelled (the client hung up, or the drain's
grace period ran out), the handler cancels the worker's future, which wakes the worker and cancels
the coroutine on the loop. Otherwise the worker would hold its pool thread, and a draining server's
shutdown, until the coroutine's own `delay` was over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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


class Handoff:
    """The worker's wait on the loop, cancellable from the loop thread.

    Either side may come first: the worker publishes its future and then looks for a cancel; the
    handler records the cancel and then looks for the future. Under the GIL at least one of them
    sees the other, so the future is always cancelled.
    """

    __slots__ = ("cancelled", "future")

    def __init__(self) -> None:
        self.cancelled = False
        self.future: concurrent.futures.Future[str] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        future = self.future
        if future is not None:
            future.cancel()  # wakes the worker; the coroutine on the loop is cancelled too


def _worker(loop: asyncio.AbstractEventLoop, delay: float, handoff: Handoff) -> dict[str, Any]:
    started = perf_counter()
    future = asyncio.run_coroutine_threadsafe(_on_loop(delay), loop)
    handoff.future = future
    if handoff.cancelled:
        future.cancel()
    try:
        ran_on = future.result(timeout=delay + 30)
    except concurrent.futures.CancelledError:
        ran_on = None  # the request is gone: nobody reads this answer
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
    handoff = Handoff()
    try:
        info = await request.app[EXECUTORS].thread.run(_worker, loop, delay, handoff)
    except asyncio.CancelledError:
        handoff.cancel()
        raise
    return demo_response(
        request,
        "threadsafe",
        started,
        delay=delay,
        loop_thread=threading.current_thread().name,
        **info,
    )
