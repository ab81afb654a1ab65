"""The connection guard: what a client may hold, bounded before a request reaches the app.

aiohttp has no header-read timeout, no connection cap and answers errors with tracebacks in debug
mode, so every connection is served by `GuardedConnection`, a subclass of aiohttp's own
`RequestHandler` (the protocol itself: nothing is forwarded through a wrapper). It adds a 408 for
a request head not complete within `--header-timeout`, a 503 past `--max-connections`, a 413 for a
`Content-Length` over `--max-body-size`, 405 for CONNECT, a bare JSON 500, `Server: loop-lab`,
and it counts the server's connections. None of it is on an ordinary GET's path (what it costs:
docs/reliability.md). It needs a few private aiohttp names: they are all in `PRIVATE_NAMES`, the
only private names the project uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp.web_response
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_request import BaseRequest
from aiohttp.web_urldispatcher import AbstractRoute, MatchInfoError

from app.monitor.accept import AcceptMonitor
from app.monitor.connections import ConnectionTracker

log = logging.getLogger("loop_lab.guard")

SERVER_NAME = "loop-lab"
# A timer that fires this late means the loop was busy (a /block), not that the client was slow:
# grant one more short round so bytes that arrived meanwhile are read before judging.
LATE_S = 0.25
SECOND_CHANCE_S = 1.0
REFUSE_LINGER_S = 2.0  # a refused client gets this long to read its 503 before the close

# Every private name of aiohttp or CPython the project relies on; each is used in this module
# only. `check_private_names()` runs when a guard is built and stops the server with an error
# naming what an upgrade removed; tests/test_guard.py runs it too, so CI fails loudly first.
PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    # (owner, name, why)
    ("aiohttp.web.RequestHandler", "_request_count", "request heads parsed: the head timer"),
    ("aiohttp.web.RequestHandler", "_messages", "requests parsed, not yet handled"),
    ("aiohttp.web.RequestHandler", "_request_in_progress", "a request is being handled"),
    ("aiohttp.web.RequestHandler", "_request_handler", "set to screen bodies (413, CONNECT)"),
    ("aiohttp.web.Server", "_kwargs", "the runner's settings a RequestHandler is built with"),
    ("aiohttp.web.BaseSite", "_server", "what BaseSite.stop() closes when draining starts"),
    ("aiohttp.web_response", "SERVER_SOFTWARE", "the default Server header, renamed"),
    ("aiohttp SystemRoute", "_handler", "a 404/405's route refers to itself: cleared"),
    # CPython 3.11's selector transport; absent on uvloop, where there is nothing to clear
    ("asyncio selector transport", "_read_ready_cb", "cleared at close: one cycle less"),
)
_SYSTEM_ROUTE_HANDLER = "_handler"  # the SystemRoute entry of PRIVATE_NAMES


def check_private_names(server: web.Server) -> None:
    """Raise RuntimeError naming what is missing if aiohttp lacks a name in PRIVATE_NAMES."""
    present = {
        "aiohttp.web.RequestHandler": set(web.RequestHandler.__slots__),
        "aiohttp.web.Server": set(vars(server)),
        "aiohttp.web.BaseSite": set(web.BaseSite.__slots__),
        "aiohttp.web_response": set(vars(aiohttp.web_response)),
        "aiohttp SystemRoute": set(vars(_unmatched_route())),
    }
    missing = [
        f"{owner}.{name}"
        for owner, name, _ in PRIVATE_NAMES
        if owner in present and name not in present[owner]
    ]
    if missing:
        raise RuntimeError(
            f"aiohttp {aiohttp.__version__} lacks what app/guard.py relies on "
            f"({', '.join(missing)}); the connection guard must be updated for it"
        )


def _unmatched_route() -> AbstractRoute:
    """The route aiohttp's router gives a request no route takes (a new one per request)."""
    return MatchInfoError(web.HTTPNotFound()).route


def release_unmatched_route(route: AbstractRoute) -> None:
    """Break the reference cycle aiohttp makes for every 404/405.

    The route aiohttp's router makes for a request no route takes (a SystemRoute) keeps a bound
    method of itself as its handler: route -> method -> route, which only a garbage-collector pass
    frees, with the HTTPException it holds. Call it once aiohttp has taken the handler out
    (its answer is written): the route then no longer needs it.
    """
    setattr(route, _SYSTEM_ROUTE_HANDLER, None)


def hide_server_version() -> None:
    """Answer `Server: loop-lab` instead of aiohttp's exact Python and aiohttp versions.

    aiohttp sets the header with `headers.setdefault(SERVER, SERVER_SOFTWARE)` on every response;
    renaming that module default costs nothing per request (a signal would cost a coroutine).
    Process-wide: every aiohttp server in this process answers with it.
    """
    aiohttp.web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]


def _raw_response(status: str, body: dict[str, object], extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nServer: {SERVER_NAME}\r\n{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


class ConnectionGuard:
    """Per-server limits and the protocol factory handed to `loop.create_server`."""

    def __init__(
        self,
        server: web.Server,
        accept: AcceptMonitor,
        connections: ConnectionTracker,
        *,
        header_timeout: float,
        max_connections: int,
        max_body_size: int,
        linger_slots: int = 64,
    ) -> None:
        check_private_names(server)
        self.server = server
        self.accept = accept
        self.connections = connections
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_body_size = max_body_size
        self.linger_slots = linger_slots
        self.lingering = 0
        self.loop = asyncio.get_running_loop()
        # what Server.__call__ builds a RequestHandler with: the runner's settings
        self.handler_kwargs: dict[str, Any] = dict(server._kwargs)
        quiet_client_errors()
        hide_server_version()
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
        """The protocol for one new connection (it hands a connection past the cap over to
        RefusedConnection: asyncio's accept loop builds protocols for a whole burst of accepted
        sockets before any of them is counted open, so the cap is judged at connection_made)."""
        return GuardedConnection(self)

    def rejection(self, request: BaseRequest) -> web.Response | None:
        """The 405/413 answer for a request that must not reach the app, else None."""
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
        return None


_feed = web.RequestHandler.data_received


class GuardedConnection(web.RequestHandler):
    """aiohttp's RequestHandler for one connection, plus the head timer and the screening."""

    __slots__ = (
        "_app_handler",
        "_armed_count",
        "_counted",
        "_deadline",
        "_guard",
        "_head_bytes",
        "_timer",
    )

    def __init__(self, guard: ConnectionGuard) -> None:
        super().__init__(guard.server, loop=guard.loop, **guard.handler_kwargs)
        self._guard = guard
        app_handler = self._request_handler
        assert app_handler is not None  # set from the Server in RequestHandler.__init__
        self._app_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]] = app_handler
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._armed_count = 0  # request heads completed when the timer was armed
        self._head_bytes = False  # bytes of the unfinished head have arrived
        self._counted = False  # counted as an open connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        open_now = guard.connections.open
        if open_now >= guard.max_connections:
            refused = RefusedConnection(guard, open_now)
            transport.set_protocol(refused)  # this handler never serves; the refusal owns it now
            refused.connection_made(transport)
            return
        super().connection_made(transport)
        guard.connections.opened()
        self._counted = True
        guard.accept.admitted()
        if guard.header_timeout > 0:
            self._arm(guard.header_timeout, head_bytes=False)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        _feed(self, data)  # aiohttp parses; each complete request head adds to _request_count
        if self._request_count != heads:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            new = self._request_count - heads
            # one bodiless request (every GET here) is checked inline: no call on the hot path
            if self._request_handler is self._app_handler and (
                new > 1 or self._messages[-1][1] is not EMPTY_PAYLOAD
            ):
                self._screen_if_bodies(new)
        elif self._timer is not None:
            self._head_bytes = True
        elif (
            data
            and not self._messages
            and not self._request_in_progress
            and self.transport is not None
            and self._guard.header_timeout > 0
        ):
            # the first bytes of a new request, and its head is not complete yet
            self._arm(self._guard.header_timeout, head_bytes=True)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._guard.connections.closed()
        transport = self.transport
        super().connection_lost(exc)
        # CPython 3.11's selector transport keeps a bound method of itself (`_read_ready_cb`) and
        # never drops it: one reference cycle per connection, socket included, that only a GC
        # pass frees, and under `--gc tuned` that is a rare full one. Its reads are over by now.
        if transport is not None and hasattr(transport, "_read_ready_cb"):
            transport._read_ready_cb = None

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error path: a 500 becomes a bare JSON answer, the traceback goes to the log."""
        if status != 500:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, ConnectionError):
            log.debug("client went away during %s %s: %r", request.method, request.path, exc)
        else:
            log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
        if request.writer.output_size > 0:  # as aiohttp: a started response cannot become a 500
            raise ConnectionError("response already started, cannot send the error")
        response = web.json_response({"error": "internal server error"}, status=500)
        response.force_close()
        return response

    # -- 413 / 405 screening --------------------------------------------------------------------

    def _screen_if_bodies(self, new: int) -> None:
        # only requests that declare a body (Content-Length, chunked) or CONNECT get a payload
        # stream from aiohttp's parser; from the first one on, this connection's requests are
        # screened (requests already queued too, which is harmless and keeps their order)
        messages = self._messages
        for index in range(len(messages) - new, len(messages)):
            if messages[index][1] is not EMPTY_PAYLOAD:
                self._request_handler = self._screened
                return

    async def _screened(self, request: BaseRequest) -> web.StreamResponse:
        rejection = self._guard.rejection(request)
        if rejection is not None:
            return rejection
        return await self._app_handler(request)

    # -- the request head timer -----------------------------------------------------------------

    def _arm(self, delay: float, *, head_bytes: bool) -> None:
        loop = self._guard.loop
        self._head_bytes = head_bytes
        self._armed_count = self._request_count
        self._deadline = loop.time() + delay
        self._timer = loop.call_at(self._deadline, self._expire, False)

    def _expire(self, late_granted: bool) -> None:
        self._timer = None
        if (
            self.transport is None
            or self._messages
            or self._request_in_progress
            or self._request_count != self._armed_count
        ):
            return  # closed already, or a request head completed: nothing to judge
        loop = self._guard.loop
        now = loop.time()
        if now - self._deadline > LATE_S and not late_granted:
            # the loop was blocked past the deadline; bytes may be waiting unread (uvloop runs
            # timers before it polls for I/O): judge after one more short round
            self._deadline = now + SECOND_CHANCE_S
            self._timer = loop.call_at(self._deadline, self._expire, True)
            return
        self._guard.accept.header_timeouts += 1
        if self._head_bytes:
            self.transport.write(self._guard.timeout_response)
        self.force_close()


class RefusedConnection(asyncio.Protocol):
    """A connection past the cap: answered 503, half-closed, then closed."""

    __slots__ = ("_closer", "_guard", "_lingering", "_open_now")

    def __init__(self, guard: ConnectionGuard, open_now: int) -> None:
        self._guard = guard
        self._open_now = open_now
        self._lingering = False
        self._closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio subclass
        guard = self._guard
        guard.accept.refuse(self._open_now)
        try:
            transport.write(guard.refusal)
            # half-close, read what the client still sends, then close: a close with unread data
            # would reset the connection and the client would never see the 503. Lingering
            # holds an fd, so only a few refusals at a time may linger; the rest close at once.
            if guard.lingering < guard.linger_slots and transport.can_write_eof():
                transport.write_eof()
                guard.lingering += 1
                self._lingering = True
                self._closer = guard.loop.call_later(REFUSE_LINGER_S, transport.close)
                return
        except OSError:  # the client is already gone
            pass
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # discard what the client still sends

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        if self._lingering:
            self._lingering = False
            self._guard.lingering -= 1


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

    __slots__ = ("_guard", "_listen_backlog", "_listen_sock")

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard, backlog: int
    ) -> None:
        super().__init__(runner, sock, backlog=backlog)
        self._guard = guard
        self._listen_sock = sock
        self._listen_backlog = backlog

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner, as SockSite does
        loop = asyncio.get_running_loop()
        # BaseSite.stop() closes `_server`: that is what stops accepting when draining starts
        self._server = await loop.create_server(
            self._guard.protocol, sock=self._listen_sock, backlog=self._listen_backlog
        )
