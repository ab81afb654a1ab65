"""`/healthz`: the cheapest probe. Its latency is the clearest sign of a starved loop."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz_handler(request: web.Request) -> web.Response:
    return web.Response(text="ok")
