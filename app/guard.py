"""The connection guard: what a client may hold, bounded before a request reaches the app.

aiohttp bounds idle keep-alive connections (`keepalive_timeout`) and header sizes, but has no
header-read timeout: a client that sends half a request line, or one header byte a second, keeps
its connection (and a file descriptor) until the keep-alive timer finally fires. So every
connection goes through a thin protocol wrapped around aiohttp's own `RequestHandler`:

- header-read timeout: from connect, or from the first byte of a later request, the request line
  and headers must be complete within `--header-timeout`, or the server answers 408 (if anything
  arrived) and closes. Idle keep-alive time between requests is aiohttp's `keepalive_timeout`.
- connection cap: past `--max-connections` open connections a new one gets 503 and is closed, so
  the process meets its own limit before the kernel's EMFILE (see app.monitor.accept).
- body bound: a `Content-Length` above `--max-body-size` gets 413 without reaching the app.
- no tracebacks: an unexpected exception is logged and answered with a bare JSON 500, whatever
  aiohttp's debug mode says (it would put the traceback in the response); requests too malformed
  to parse get aiohttp's 400 without a traceback in the log; CONNECT gets 405, not 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from app.monitor.accept import AcceptMonitor

log = logging.getLogger("loop_lab.guard")

# A timer that fires this late means the loop was busy (a /block), not that the client was slow:
# grant one more short round so bytes that arrived meanwhile are read before judging.
LATE_S = 0.25
SECOND_CHANCE_S = 1.0
REFUSE_LINGER_S = 2.0  # a refused client gets this long to read its 503 before the close


def _raw_response(status: str, body: dict[str, object], extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


class ConnectionGuard:
    """Per-server limits and the two hooks into aiohttp: the protocol factory and the handler."""

    def __init__(
        self,
        server: web.Server,
        accept: AcceptMonitor,
        open_connections: Callable[[], int],
        *,
        header_timeout: float,
        max_connections: int,
        max_body_size: int,
        linger_slots: int = 64,
    ) -> None:
        self.server = server
        self.accept = accept
        self.open_connections = open_connections
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_body_size = max_body_size
        self.linger_slots = linger_slots
        self.lingering = 0
        self.loop = asyncio.get_running_loop()
        quiet_client_errors()
        self._app_handler = server.request_handler
        # RequestHandler copies this attribute when it is built: install before the first connection
        server.request_handler = self.handle
        self.refusal = _raw_response(
            "503 Service Unavailable",
            {
                "error": "server at its connection limit",
                "param": "connections",
                "allowed": f"at most {max_connections} open connections (--max-connections)",
            },
            "Retry-After: 1\r\n",
        )
        self.timeout_response = _raw_response(
            "408 Request Timeout",
            {
                "error": "request line and headers did not arrive in time",
                "param": "headers",
                "allowed": f"complete request head within {header_timeout:g}s (--header-timeout)",
            },
        )

    def protocol(self) -> GuardedConnection:
        """The protocol factory handed to `loop.create_server`."""
        return GuardedConnection(self)

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        """Wraps the app: marks the request head complete, bounds the body, hides tracebacks."""
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if not isinstance(conn, GuardedConnection):
            conn = None
        if conn is not None:
            conn.request_started()
        try:
            if request.method == "CONNECT":  # a proxy verb; without this its target 404s
                body = {"error": "CONNECT is not served here", "param": "method", "allowed": "GET"}
                return web.json_response(body, status=405, headers={"Allow": "GET, HEAD"})
            length = request.content_length
            if length is not None and length > self.max_body_size:
                body = {
                    "error": f"request body of {length} bytes is too large",
                    "param": "Content-Length",
                    "allowed": f"at most {self.max_body_size} bytes (--max-body-size)",
                }
                return web.json_response(body, status=413)
            return await self._app_handler(request)
        except (web.HTTPException, OSError, asyncio.CancelledError):
            raise  # aiohttp turns these into responses, closes, or logs a client disconnect
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = web.json_response({"error": "internal server error"}, status=500)
            response.force_close()
            return response
        finally:
            if conn is not None:
                conn.request_finished()


class GuardedConnection(asyncio.Protocol):
    """One client connection: forwards everything to aiohttp's RequestHandler, times the head."""

    __slots__ = (
        "_active",
        "_deadline",
        "_guard",
        "_inner",
        "_late_granted",
        "_lingering",
        "_received",
        "_timer",
        "_transport",
    )

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: web.RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._active = 0  # requests of this connection being handled
        self._received = False  # bytes of an unfinished request head have arrived
        self._late_granted = False
        self._lingering = False  # a refused connection waiting for its client to close

    # -- asyncio.Protocol, forwarded ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio subclass
        self._transport = transport
        guard = self._guard
        open_now = guard.open_connections()
        if open_now >= guard.max_connections:
            self._refuse(transport, open_now)
            return
        guard.accept.admitted()
        inner = guard.server()  # aiohttp's RequestHandler, built with the runner's settings
        self._inner = inner
        inner.connection_made(transport)
        if guard.header_timeout > 0:
            self._arm(guard.header_timeout)

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return  # a refused connection: discard what the client still sends
        if self._active == 0:
            self._received = True
            if self._timer is None and self._guard.header_timeout > 0:
                self._arm(self._guard.header_timeout)
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()  # aiohttp ignores EOF and lets the transport close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._lingering:
            self._lingering = False
            self._guard.lingering -= 1
        self._transport = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- the request head timer -----------------------------------------------------------------

    def request_started(self) -> None:
        self._active += 1
        self._received = False
        self._cancel_timer()

    def request_finished(self) -> None:
        self._active -= 1

    def _arm(self, delay: float) -> None:
        loop = self._guard.loop
        self._late_granted = False
        self._deadline = loop.time() + delay
        self._timer = loop.call_at(self._deadline, self._expire)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._active or self._inner is None or self._transport is None:
            return
        loop = self._guard.loop
        now = loop.time()
        if now - self._deadline > LATE_S and not self._late_granted:
            # the loop was blocked past the deadline; bytes may be waiting unread (uvloop runs
            # timers before it polls for I/O): judge after one more short round
            self._deadline = now + SECOND_CHANCE_S
            self._timer = loop.call_at(self._deadline, self._expire)
            self._late_granted = True
            return
        self._guard.accept.header_timeouts += 1
        if self._received:
            self._transport.write(self._guard.timeout_response)
        self._inner.force_close()  # closes the transport once the 408 is flushed

    # -- refusing -------------------------------------------------------------------------------

    def _refuse(self, transport: asyncio.Transport, open_now: int) -> None:
        guard = self._guard
        guard.accept.refuse(open_now)
        try:
            transport.write(guard.refusal)
            # half-close, read what the client still sends, then close: a close with unread data
            # would reset the connection and the client would never see the 503. Lingering
            # holds an fd, so only a few refusals at a time may linger; the rest close at once.
            if guard.lingering < guard.linger_slots and transport.can_write_eof():
                transport.write_eof()
                guard.lingering += 1
                self._lingering = True
                self._timer = guard.loop.call_later(REFUSE_LINGER_S, transport.close)
                return
        except OSError:  # the client is already gone
            pass
        transport.close()


class _ClientErrorFilter(logging.Filter):
    """Drops aiohttp's ERROR-with-traceback for requests it could not parse (the client's fault:
    the client already got its 400); one scanner would otherwise fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500)


_CLIENT_ERROR_FILTER = _ClientErrorFilter()


def quiet_client_errors() -> None:
    """Install the filter on aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    if _CLIENT_ERROR_FILTER not in logger.filters:
        logger.addFilter(_CLIENT_ERROR_FILTER)


def fd_reserve(fd_limit: int) -> int:
    """File descriptors kept free of connections: for refusals, pools, logs, /proc reads."""
    return max(16, min(512, fd_limit // 10))


def connection_limit(fd_limit: int, fds_in_use: int) -> int:
    """Connections that fit under the fd limit, keeping the reserve free."""
    return max(1, fd_limit - fds_in_use - fd_reserve(fd_limit))


class GuardedSite(web.SockSite):
    """A SockSite whose connections go through the guard's protocol."""

    __slots__ = ("_guard",)

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard, backlog: int
    ) -> None:
        super().__init__(runner, sock, backlog=backlog)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner, as SockSite does
        loop = asyncio.get_running_loop()
        # BaseSite.stop() closes `_server`: that is what stops accepting when draining starts
        self._server = await loop.create_server(
            self._guard.protocol, sock=self._sock, backlog=self._backlog
        )
