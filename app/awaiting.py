"""`/await`: `await asyncio.sleep` hands the loop back, so it serves everyone else meanwhile."""

from __future__ import annotations

import asyncio
from time import perf_counter

from aiohttp import web

from app.params import delay_param
from app.responses import demo_response

routes = web.RouteTableDef()


@routes.get("/await")
async def await_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    delay = delay_param(request, default=0.1)
    await asyncio.sleep(delay)
    return demo_response(request, "await", started, delay=delay)
