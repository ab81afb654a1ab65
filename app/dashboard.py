"""`/`: the live dashboard, a self-contained page (no CDN, works offline) fed by `/events`."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")
PAGE = STATIC_DIR / "dashboard.html"

# Everything the page loads comes from this server; the browser enforces it, so a stray CDN link
# or inline script shows up as a console error (the browser test fails on those).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

routes = web.RouteTableDef()


@routes.get("/")
async def dashboard_handler(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        PAGE,
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",  # revalidate, so an upgraded server serves its own page
        },
    )


# the page's own files, from a handler of the app (so the monitor meters them like any route)
FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}


@routes.get("/static/{name}")
async def static_handler(request: web.Request) -> web.FileResponse:
    path = FILES.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)
