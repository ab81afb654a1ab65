"""What a shared deployment can switch off: the endpoints that stall the loop or burn a core.

`/block` freezes every client of the process and `/cpu` holds a core (and, inline, the loop) for
seconds; on a server others use, `--disable-blocking` makes both answer 403 with an explanation.
"""

from __future__ import annotations

import json

from aiohttp import web

from app.keys import SETTINGS


def ensure_allowed(request: web.Request, what: str) -> None:
    """Raise 403 (JSON) if this server refuses endpoints that stall the loop or burn CPU."""
    if request.app[SETTINGS].disable_blocking:
        body = {
            "error": f"{request.path} is disabled on this server: it {what}",
            "param": "path",
            "allowed": "/await, /offload, /gather, /schedule, /threadsafe (restart without "
            "--disable-blocking / LOOP_LAB_DISABLE_BLOCKING to allow it)",
        }
        raise web.HTTPForbidden(text=json.dumps(body), content_type="application/json")
