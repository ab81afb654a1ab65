"""`/block`: `time.sleep` on the loop thread; nothing else runs until it returns."""

from __future__ import annotations

import time
from time import perf_counter

from aiohttp import web

from app.params import delay_param
from app.policy import ensure_allowed
from app.responses import demo_response

routes = web.RouteTableDef()


@routes.get("/block")
async def block_handler(request: web.Request) -> web.Response:
    ensure_allowed(request, "blocks the event loop, stalling every client")
    started = perf_counter()
    delay = delay_param(request, default=0.1)
    time.sleep(delay)  # deliberately blocking: this is the bug the endpoint demonstrates
    return demo_response(request, "block", started, delay=delay)
