"""The app factory: routes, instrumentation, and resources tied to the app's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from app import (
    awaiting,
    blocking,
    cpu,
    dashboard,
    database,
    endpoints,
    events,
    gathering,
    gctune,
    health,
    metrics,
    offload,
    resolving,
    scheduling,
    serialising,
    stats,
    tasks,
    threadsafe,
    upstream,
)
from app.config import Settings
from app.executors import Executors
from app.keys import EXECUTORS, SETTINGS
from app.monitor import monitor, unmatched

SLOW_CALLBACK_S = 0.05  # what asyncio debug mode reports as a slow callback


async def executors_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    executors = Executors(settings.thread_workers, settings.process_workers, settings.pool_queue)
    app[EXECUTORS] = executors
    # start the worker processes now: spawning them on a request's first submit stalls the loop
    await executors.process.run(int)
    try:
        yield
    finally:
        # shutting pools down joins workers: keep that off the loop
        await asyncio.get_running_loop().run_in_executor(None, executors.shutdown)


async def debug_ctx(app: web.Application) -> AsyncIterator[None]:
    if app[SETTINGS].debug:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_CALLBACK_S
    yield


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    # bodies are bounded for handlers that read them; app.guard answers a larger Content-Length
    app = web.Application(
        client_max_size=settings.max_body_size,
        handler_args=unmatched.handler_args(settings.access_log),  # counts what no route took
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(debug_ctx)
    monitor.setup(app)  # every request is counted and step-profiled: routes go through it
    app.cleanup_ctx.append(executors_ctx)
    # the real loop killers' resources (after the pools they use; closed before them)
    app.cleanup_ctx.extend(
        [resolving.default_executor_ctx, database.database_ctx, upstream.upstream_ctx]
    )
    for module in (
        awaiting,
        blocking,
        offload,
        cpu,
        gathering,
        scheduling,
        threadsafe,
        database,
        upstream,
        resolving,
        serialising,
        health,
        stats,
        tasks,
        metrics,
        endpoints,
        dashboard,
    ):
        monitor.add_routes(app, module.routes)
    events.setup(app)  # /events and its broadcaster, started after the monitor and executors
    gctune.setup(app)  # --gc, applied at startup after the rest; collections timed
    app.on_startup.append(monitor.start_sampling)  # last: startup work is not loop lag
    return app
