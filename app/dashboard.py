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


routes.static("/static", STATIC_DIR)
