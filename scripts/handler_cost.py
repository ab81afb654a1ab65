"""Instructions per request in aiohttp's own request handling, with and without a middleware.

Why the monitor meters handlers instead of using a middleware (docs/benchmarks.md): this runs
`Application._handle` (what aiohttp's server calls for each request) N times on one mocked
`/healthz` request, in-process, for one variant, so callgrind's total for two values of N gives
the instructions of one request:

    for n in 2000 12000; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python scripts/handler_cost.py VARIANT $n 2>&1 | grep Collected; done

VARIANT: `bare` (no middleware), `middleware` (one that only calls the handler), `metered` (the
route registered through the monitor). (total at 12000 - total at 2000) / 10000 is one request.
No sockets: it prices the handling only, not a whole request (scripts/instructions.py does that).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Handler

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `app` importable
    sys.path.insert(0, str(ROOT))

from app.monitor import metering  # noqa: E402
from app.monitor.route_stats import RouteStats  # noqa: E402

VARIANTS = ("bare", "middleware", "metered")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@web.middleware
def only_calls_the_handler(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    return handler(request)  # a plain function: no coroutine of its own, as the monitor's was


def make_app(variant: str) -> web.Application:
    app = web.Application(middlewares=[only_calls_the_handler] if variant == "middleware" else [])
    if variant == "metered":
        metering.add_routes(app, RouteStats(), [web.get("/healthz", healthz)])
    else:
        app.router.add_get("/healthz", healthz)
    app.freeze()
    return app


async def handle(variant: str, n: int) -> None:
    app = make_app(variant)
    request = make_mocked_request("GET", "/healthz", app=app)
    for _ in range(n):
        await app._handle(request)  # what aiohttp's server calls for every request


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in VARIANTS or not argv[1].isdigit():
        print(f"usage: handler_cost.py {{{'|'.join(VARIANTS)}}} N", file=sys.stderr)
        return 2
    asyncio.run(handle(argv[0], int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
