"""`/json`: serialising a K-kilobyte document with `json.dumps` on the loop, in a thread, or in a
process.

`json.dumps` runs in C and holds the GIL from start to end (C code never reaches the interpreter's
switch points): inline it blocks the loop; in a thread it blocks the loop just the same, since the
loop thread needs the GIL back to run anything; in a process the loop stays free. The document is
one ~1 KB row repeated, so building it costs next to nothing and the time is the encoder's.
"""

from __future__ import annotations

import json
from time import perf_counter
from typing import Any

from aiohttp import web

from app.executors import VIA
from app.keys import EXECUTORS
from app.params import choice_param, int_param
from app.responses import demo_response

routes = web.RouteTableDef()

MAX_KB = 16_384  # 16 MB of JSON: a few hundred ms of encoding

# one row of about 1 KB of JSON: strings that need escaping, numbers, floats, nesting
ROW: dict[str, Any] = {
    "id": 123456789,
    "name": 'item "quoted" \\ with unicode \u00e9\u4e2d and a tab\t',
    "price": 1234.5678,
    "ratio": 0.1 + 0.2,
    "active": True,
    "missing": None,
    "tags": [f"tag-{i}" for i in range(12)],
    "scores": [i * 1.5 for i in range(20)],
    "owner": {"id": 42, "email": "someone@example.invalid", "roles": ["reader", "writer"]},
    "text": "lorem ipsum dolor sit amet " * 16,
}
ROW_BYTES = len(json.dumps(ROW)) + 2  # with the ", " between rows


def serialise(kb: int) -> int:
    """Encode a document of about `kb` KB; the length of the text (the text stays where it ran)."""
    document = {"rows": [ROW] * max(1, kb * 1024 // ROW_BYTES)}
    return len(json.dumps(document))


@routes.get("/json")
async def json_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    kb = int_param(request, "kb", default=1024, lo=1, hi=MAX_KB)
    via = choice_param(request, "via", VIA, "inline")
    size = await request.app[EXECUTORS].run_via(via, serialise, kb)
    return demo_response(request, "json", started, kb=kb, via=via, chars=size)
