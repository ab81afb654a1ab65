"""`/upstream`: an outbound HTTP call to a slow server: `requests` on the loop, `aiohttp`, or
`requests` in the thread pool.

The slow server is never this one. `requests` on the loop holds the loop until the answer comes,
so asking this same loop's `/await` would wait for a loop that cannot run: a deadlock until the
timeout. Unless `--upstream-url` names one, loop-lab starts its own on loopback, in a thread with
its own event loop, at start-up, and stops it at shutdown.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from time import perf_counter
from typing import Any

import aiohttp
import requests
from aiohttp import web

from app.keys import EXECUTORS, HTTP_CLIENT, SETTINGS, UPSTREAM
from app.params import choice_param, delay_param
from app.policy import ensure_allowed
from app.responses import demo_response, unavailable

routes = web.RouteTableDef()

CLIENTS = ("requests", "aiohttp", "offload")
MAX_UPSTREAM_DELAY = 3600.0
START_TIMEOUT_S = 10.0


async def _slow_handler(request: web.Request) -> web.Response:
    """The upstream's only route: `/await?delay=S` sleeps S seconds, then answers."""
    try:
        delay = float(request.query.get("delay", "0"))
    except ValueError:
        delay = -1.0
    if not 0.0 <= delay <= MAX_UPSTREAM_DELAY:  # also rejects nan
        raise web.HTTPBadRequest(text="delay must be 0..3600 seconds")
    await asyncio.sleep(delay)
    return web.json_response({"upstream": "await", "delay": delay})


class Upstream:
    """The slow server /upstream calls: ours (a thread with its own loop) or `--upstream-url`."""

    def __init__(self, url: str = "") -> None:
        self.url = url
        self.own = not url
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="looplab-upstream", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/await", _slow_handler)
        runner = web.AppRunner(app, access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> None:
        """Start our own upstream and wait until it listens (blocking: call it off the loop)."""
        if not self.own:
            return
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"the upstream server did not start: {self._error!r}")

    def stop(self) -> None:
        """Stop our own upstream and join its thread (blocking: call it off the loop)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(START_TIMEOUT_S)


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    upstream = Upstream(app[SETTINGS].upstream_url)
    await loop.run_in_executor(None, upstream.start)
    app[UPSTREAM] = upstream
    # one client session for the whole app: its connection pool is what makes aiohttp cheap
    async with aiohttp.ClientSession() as session:
        app[HTTP_CLIENT] = session
        try:
            yield
        finally:
            await loop.run_in_executor(None, upstream.stop)


def requests_get(url: str, timeout: float) -> Any:
    """The blocking client: the calling thread waits in recv() until the upstream answers."""
    response = requests.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()


@routes.get("/upstream")
async def upstream_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    delay = delay_param(request, default=0.1)
    client = choice_param(request, "client", CLIENTS, "aiohttp")
    if client == "requests":
        ensure_allowed(request, "makes a blocking HTTP call on the event loop")
    base = request.app[UPSTREAM].url
    url = f"{base}/await?delay={delay:g}"
    timeout = request.app[SETTINGS].upstream_timeout
    try:
        if client == "requests":
            answer = requests_get(url, timeout)  # the loop waits for the upstream: the bug
        elif client == "offload":
            answer = await request.app[EXECUTORS].thread.run(requests_get, url, timeout)
        else:
            session = request.app[HTTP_CLIENT]
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                response.raise_for_status()
                answer = await response.json()
    except (requests.RequestException, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise unavailable("upstream", exc, upstream=base, client=client) from None
    return demo_response(
        request, "upstream", started, client=client, delay=delay, upstream=url, answer=answer
    )
