"""`/events`: server-sent events feeding the live dashboard, from one shared broadcaster.

One task per app builds one snapshot per tick, serializes it once and offers the same bytes to every
open stream, so 50 dashboards cost 50 small socket writes per tick, not 50 snapshots, and no
dashboard costs no snapshot (a fresh one is built when the first stream opens). Each stream
has a small drop-oldest buffer: a client that stops reading loses stale updates, never the server's
memory, and a write that cannot finish within `WRITE_TIMEOUT_S` ends that stream. The broadcaster
is just another callback on the loop it watches: while a handler blocks the loop no tick runs, the
stream pauses, and the page draws that gap from the server timestamps (`t`) in the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web

from app.keys import BROADCASTER, MONITOR, SETTINGS
from app.monitor import monitor
from app.monitor.metering import unmetered
from app.stats import snapshot

log = logging.getLogger("loop_lab.events")

routes = web.RouteTableDef()

TICK_S = 0.25  # four updates a second: smooth enough to watch, cheap enough to ignore
BUFFER_EVENTS = 4  # per-client backlog (one second); older updates are dropped first
WRITE_TIMEOUT_S = 5.0  # a client whose socket stays full this long is cut off
RECENT_LAG_S = 1.0  # "lag now" = worst lag in the last second, so a stall shows at once
RATE_WINDOW_S = 1.0  # requests per second are averaged over the last second
RETRY_MS = 1000  # EventSource reconnect delay after the stream ends (server restart, shutdown)


class Subscriber:
    """One open /events stream: a bounded, drop-oldest backlog of encoded events."""

    def __init__(
        self, transport: asyncio.Transport | None, capacity: int, write_timeout: float
    ) -> None:
        self.transport = transport
        self.write_timeout = write_timeout
        self.backlog: deque[bytes] = deque(maxlen=capacity)
        self.dropped = 0
        self.closed = False
        self.writing = False
        self._wakeup = asyncio.Event()

    def offer(self, chunk: bytes) -> None:
        """Queue `chunk` without ever waiting; a full backlog loses its oldest event."""
        if len(self.backlog) == self.backlog.maxlen:
            self.dropped += 1
        self.backlog.append(chunk)
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()
        if self.writing and self.transport is not None:
            # a stream stuck writing to a client that does not read must not hold up shutdown
            self.transport.abort()

    async def send(self, response: web.StreamResponse, chunk: bytes) -> None:
        """Write `chunk`; TimeoutError if the client's socket stays full for `write_timeout` s."""
        self.writing = True
        try:
            async with asyncio.timeout(self.write_timeout):
                await response.write(chunk)
        finally:
            self.writing = False

    async def next(self) -> bytes | None:
        """The oldest queued event, or None once the stream is closed."""
        while not self.backlog and not self.closed:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.closed:
            return None
        return self.backlog.popleft()


class Broadcaster:
    """Builds one dashboard update per tick and fans it out to every subscriber."""

    def __init__(
        self,
        app: web.Application,
        tick: float = TICK_S,
        buffer: int = BUFFER_EVENTS,
        write_timeout: float = WRITE_TIMEOUT_S,
    ) -> None:
        self._app = app
        self.tick = tick
        self.buffer = buffer
        self.write_timeout = write_timeout
        self.subscribers: set[Subscriber] = set()
        self.seq = 0
        self.snapshots_built = 0
        self.dropped_total = 0
        self.closed = False
        self.latest: bytes | None = None
        # names this server instance, so a page can tell a restart even when the pid is reused
        self.server_id = uuid.uuid4().hex[:12]
        self._totals: deque[tuple[float, int]] = deque()  # (monotonic, requests_total)
        self._task: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._task is not None, "broadcaster not started"
        return self._task.get_loop()

    def start(self) -> None:
        self.publish()  # a first update exists before the first client connects
        self._task = asyncio.create_task(self._run(), name="looplab-events-broadcaster")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                if self.subscribers:
                    self.publish()
                else:  # nobody watching: a snapshot (~1 ms) a tick would be waste
                    self._rps(time.monotonic(), self._app[MONITOR].routes.total)
            except Exception:  # a bad tick must not end the stream for good
                log.exception("building a dashboard update failed")

    def _rps(self, now: float, total: int) -> float:
        """Requests per second over the last RATE_WINDOW_S, with `total` counted at `now`."""
        totals = self._totals
        totals.append((now, total))
        while len(totals) > 2 and totals[1][0] <= now - RATE_WINDOW_S:
            totals.popleft()
        then, then_total = totals[0]
        return (total - then_total) / (now - then) if now > then else 0.0

    def build(self) -> dict[str, Any]:
        """The update every client gets this tick: /stats plus what only a live view needs."""
        app = self._app
        now = time.monotonic()
        stats = snapshot(app)
        rps = self._rps(now, int(stats["requests_total"]))
        recent = app[MONITOR].lag.summary(window=RECENT_LAG_S).max_ms
        self.seq += 1
        self.snapshots_built += 1
        return {
            "seq": self.seq,
            "server_id": self.server_id,
            "t": round(now, 4),
            "tick_s": self.tick,
            **stats,
            "lag_recent_ms": round(recent, 3),
            "lag_recent_window_s": RECENT_LAG_S,
            "rps": round(rps, 2),
            "dashboards": len(self.subscribers),
            "max_delay_s": app[SETTINGS].max_delay,
        }

    def publish(self) -> None:
        """Build one update, encode it once, and offer the same bytes to every subscriber."""
        update = self.build()
        data = json.dumps(update, separators=(",", ":"))
        chunk = f"id: {update['seq']}\ndata: {data}\n\n".encode()
        self.latest = chunk
        for subscriber in self.subscribers:
            before = subscriber.dropped
            subscriber.offer(chunk)
            self.dropped_total += subscriber.dropped - before

    @contextlib.contextmanager
    def subscribe(self, transport: asyncio.Transport | None) -> Iterator[Subscriber]:
        subscriber = Subscriber(transport, self.buffer, self.write_timeout)
        if self.closed:
            subscriber.close()
        else:
            if not self.subscribers:  # idle until now: what `latest` holds is stale
                self.publish()
            if self.latest is not None:
                subscriber.offer(self.latest)  # the page has figures at once, not a tick later
        self.subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)

    def close_streams(self) -> None:
        """End every open stream (they reconnect to whichever server answers next)."""
        self.closed = True
        for subscriber in list(self.subscribers):
            subscriber.close()

    async def stop(self) -> None:
        self.close_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def events_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the broadcaster runs exactly as long as the app."""
    # module constants read here, at start, so a test can shorten them
    broadcaster = Broadcaster(app, TICK_S, BUFFER_EVENTS, WRITE_TIMEOUT_S)
    app[BROADCASTER] = broadcaster
    broadcaster.start()
    try:
        yield
    finally:
        await broadcaster.stop()


async def end_streams(app: web.Application) -> None:
    """on_shutdown runs before aiohttp waits for in-flight handlers: SSE streams never end on
    their own, so close them here or every open dashboard would hold SIGTERM's drain for the
    whole grace period."""
    broadcaster = app.get(BROADCASTER)
    if broadcaster is not None:
        broadcaster.close_streams()


@routes.get("/events")
@unmetered
async def events_handler(request: web.Request) -> web.StreamResponse:
    broadcaster = request.app[BROADCASTER]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # tell a proxy in front not to hold updates back
        }
    )
    transport = request.transport
    with broadcaster.subscribe(transport) as subscriber:
        try:
            await response.prepare(request)
            await subscriber.send(response, f"retry: {RETRY_MS}\n\n".encode())
            while (chunk := await subscriber.next()) is not None:
                await subscriber.send(response, chunk)
        except (ConnectionError, TimeoutError):
            # the client left, or stopped reading: drop the connection, keep nothing
            if transport is not None:
                transport.abort()
    return response


def setup(app: web.Application) -> None:
    """Register /events, the broadcaster's lifetime, and the early end of streams on shutdown."""
    monitor.add_routes(app, routes)  # /events is @unmetered: registered as it is
    app.cleanup_ctx.append(events_ctx)
    app.on_shutdown.append(end_streams)
