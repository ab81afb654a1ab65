"""Accepting connections under pressure: fd exhaustion, the connection cap, header timeouts.

What each loop does when `accept()` fails with EMFILE (measured in docs/reliability.md):

- asyncio (3.11) reports "socket.accept() out of system resource" to the loop's exception handler,
  stops watching the listening socket and retries a second later; new clients wait in the listen
  backlog meanwhile. Its accept loop does not stop at the first failure (CPython gh-151615): one
  readable event makes `backlog` failed accept() calls, each logged with a traceback by the default
  handler, enough to drown the loop. This monitor's handler counts them and logs one line.
- uvloop (libuv) closes a reserve fd, accepts every pending connection and closes it at once, then
  carries on: the clients see their connection closed and the application hears nothing.

So the server counts what it can see: accept errors (asyncio), connections it refused because it
was at `--max-connections` (both loops; the cap sits below the fd limit so this happens first),
and connections closed by the header-read timeout. Each episode is logged once when it starts and
once when the server accepts again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("loop_lab.accept")

# the errors asyncio treats as "out of resources" when accept() fails
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# an episode ends once nothing failed for this long (asyncio retries accept() every second)
QUIET_S = 2.0

ExceptionHandler = Any  # asyncio's handler type is private; (loop, context) -> object


class AcceptMonitor:
    def __init__(self) -> None:
        self.fd_limit = 0
        self.max_connections = 0
        self.accept_errors: dict[str, int] = {}
        self.refused = 0
        self.header_timeouts = 0
        self.episodes = 0
        self.failing_since: float | None = None  # monotonic time the current episode began
        self.last_failure = 0.0
        self._errors_at_start = 0
        self._refused_at_start = 0
        self._previous_handler: ExceptionHandler = None

    @property
    def failing(self) -> bool:
        """In an episode, with a failure in the last QUIET_S seconds."""
        return self.failing_since is not None and time.monotonic() - self.last_failure < QUIET_S

    @property
    def accept_errors_total(self) -> int:
        return sum(self.accept_errors.values())

    def configure(self, fd_limit: int, max_connections: int) -> None:
        self.fd_limit = fd_limit
        self.max_connections = max_connections

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route the loop's accept-resource errors here; everything else goes where it went."""
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._handle_exception)

    def _handle_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS and "accept" in message:
            self.accept_failed(exc)
        elif isinstance(exc, ValueError) and "_start_serving" in message:
            # one accept retry per failed accept() (gh-151615) is still scheduled when the
            # listening socket closes; each then fails on the closed fd: nothing to report
            pass
        elif self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def accept_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        begins = self._failed()  # before counting, so the episode's own counts start at it
        self.accept_errors[name] = self.accept_errors.get(name, 0) + 1
        if begins:
            log.error(
                "accept() failed: %s (%s). The process is out of file descriptors "
                "(limit %d); new clients wait in the listen backlog and are accepted once "
                "connections close. Raise `ulimit -n` or lower --max-connections. "
                "Further accept errors are counted in /stats and /metrics, not logged.",
                exc.strerror,
                name,
                self.fd_limit,
            )

    def refuse(self, open_connections: int) -> None:
        """A new connection was answered 503 because `open_connections` reached the cap."""
        begins = self._failed()
        self.refused += 1
        if begins:
            log.error(
                "connection limit reached: %d connections open (--max-connections %d, fd limit "
                "%d); new connections get 503 until some close. Further refusals are counted "
                "in /stats and /metrics, not logged.",
                open_connections,
                self.max_connections,
                self.fd_limit,
            )

    def admitted(self) -> None:
        """A connection was accepted: ends an episode that has been quiet for QUIET_S."""
        if self.failing_since is not None and time.monotonic() - self.last_failure >= QUIET_S:
            log.warning(
                "accepting connections again after %.1fs: %d accept errors and %d refused "
                "connections in that episode",
                time.monotonic() - self.failing_since,
                self.accept_errors_total - self._errors_at_start,
                self.refused - self._refused_at_start,
            )
            self.failing_since = None

    def _failed(self) -> bool:
        """Note a failure; True if it begins an episode (the one time it is logged)."""
        self.last_failure = time.monotonic()
        if self.failing_since is not None:
            return False
        self.failing_since = self.last_failure
        self.episodes += 1
        self._errors_at_start = self.accept_errors_total
        self._refused_at_start = self.refused
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "fd_limit": self.fd_limit,
            "max_connections": self.max_connections,
            "failing": self.failing,
            "episodes": self.episodes,
            "accept_errors": self.accept_errors_total,
            "accept_errors_by_errno": dict(self.accept_errors),
            "refused": self.refused,
            "header_timeouts": self.header_timeouts,
        }

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_AcceptCollector(self))


class _AcceptCollector(Collector):
    def __init__(self, monitor: AcceptMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        m = self._monitor
        errors = CounterMetricFamily(
            "looplab_accept_errors",
            "accept() calls that failed for lack of resources (EMFILE, ...), by errno.",
            labels=["errno"],
        )
        for name in sorted(m.accept_errors) or ["EMFILE"]:
            errors.add_metric([name], m.accept_errors.get(name, 0))
        yield errors
        yield CounterMetricFamily(
            "looplab_refused_connections",
            "Connections answered 503 and closed because --max-connections were open.",
            value=m.refused,
        )
        yield CounterMetricFamily(
            "looplab_header_timeouts",
            "Connections closed because the request head did not arrive within --header-timeout.",
            value=m.header_timeouts,
        )
        yield GaugeMetricFamily(
            "looplab_accept_failing",
            "1 while the server cannot accept (out of fds or at --max-connections), else 0.",
            value=int(m.failing),
        )
        yield GaugeMetricFamily(
            "looplab_fd_limit", "RLIMIT_NOFILE soft limit at start.", value=m.fd_limit
        )
        yield GaugeMetricFamily(
            "looplab_max_connections",
            "Open connections before new ones are refused.",
            value=m.max_connections,
        )
