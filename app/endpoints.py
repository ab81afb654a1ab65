"""`/endpoints`: every endpoint with a ready-to-paste curl line (`/` is the live dashboard)."""

from __future__ import annotations

import html

from aiohttp import web

routes = web.RouteTableDef()

ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/await?delay=1", "await asyncio.sleep: the loop serves others meanwhile"),
    ("/block?delay=1", "time.sleep on the loop: everything stalls"),
    ("/offload?delay=1&pool=thread", "run_in_executor in a thread: the loop stays free"),
    ("/offload?delay=1&pool=process", "run_in_executor in a process"),
    ("/cpu?n=2000000&via=inline", "CPU-bound work on the loop (via=inline|thread|process)"),
    ("/gather?n=100&delay=1", "create_task + gather: total is the max delay, not the sum"),
    ("/schedule", "the real order of call_soon / call_later / call_at / I/O callbacks"),
    (
        "/threadsafe?delay=0.5",
        "a worker thread schedules a coroutine with run_coroutine_threadsafe",
    ),
    ("/db?driver=sync&delay=0.5", "a database query with a blocking driver on the loop"),
    ("/db?driver=async&delay=0.5", "the same query with an async driver (driver=offload: pool)"),
    ("/upstream?client=requests&delay=0.5", "requests on the loop, calling a slow upstream"),
    ("/upstream?client=aiohttp&delay=0.5", "the same call with aiohttp (client=offload: pool)"),
    ("/resolve?n=200", "200 concurrent getaddrinfo calls queue on a fixed-size pool"),
    ("/json?kb=8192&via=inline", "json.dumps of 8 MB on the loop (via=inline|thread|process)"),
    ("/healthz", "cheapest probe"),
    ("/stats", "JSON snapshot: loop lag, connections, routes, executors"),
    ("/metrics", "Prometheus exposition"),
    ("/events", "server-sent events: one dashboard update per tick (curl -N to watch)"),
)


def render_endpoints(host: str) -> str:
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(path)}'>{html.escape(path.split('?')[0])}</a></td>"
        f"<td>{html.escape(what)}</td>"
        f"<td><code>curl -s 'http://{html.escape(host)}{html.escape(path)}'</code></td></tr>"
        for path, what in ENDPOINTS
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loop-lab</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}td{{padding:.3rem .8rem}}</style>
</head><body><h1>loop-lab endpoints</h1>
<p><a href="/">&larr; live dashboard</a></p>
<table><thead><tr><th>endpoint</th><th>shows</th><th>try it</th></tr></thead>
<tbody>
{rows}
</tbody></table></body></html>
"""


@routes.get("/endpoints")
async def endpoints_handler(request: web.Request) -> web.Response:
    return web.Response(text=render_endpoints(request.host), content_type="text/html")
