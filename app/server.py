"""Serving: listen socket and backlog, fd limit, SO_REUSEPORT workers, graceful drain on signals."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import multiprocessing
import os
import resource
import signal
import socket
from dataclasses import dataclass, replace
from types import FrameType

from aiohttp import web

from app.application import create_app
from app.config import Settings
from app.guard import ConnectionGuard, GuardedSite, connection_limit, fd_reserve
from app.keys import MONITOR
from app.loops import loop_factory
from app.monitor.process import open_fds, raise_nofile_limit

log = logging.getLogger("loop_lab")

TARGET_CONNECTIONS = 10_000  # what the multiplex scenario holds open
FD_HEADROOM = 256  # pools, logs, pipes, the listening socket, the watchdog...
DRAIN_POLL_S = 0.01  # how often the drain looks at the in-flight count
# after the grace period aiohttp waits this long (twice: handler, then its cancellation) per
# request still running before it closes the connection
CUT_TIMEOUT_S = 0.25


def raise_fd_limit(backlog: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; warn if 10k connections will not fit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = raise_nofile_limit()
    needed = TARGET_CONNECTIONS + backlog + FD_HEADROOM
    log.info("RLIMIT_NOFILE soft limit %d (hard %d)", soft, hard)
    if soft < needed:
        log.warning(
            "RLIMIT_NOFILE is %d: too low for %d connections plus a %d backlog (needs ~%d); "
            "raise the hard limit (ulimit -Hn, or docker's ulimits: nofile) before a 10k run",
            soft,
            TARGET_CONNECTIONS,
            backlog,
            needed,
        )
    return soft


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def listen_socket(
    host: str, port: int, backlog: int, reuse_port: bool, *, listen: bool = True
) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class RunningServer:
    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, free resources."""
        await self.runner.cleanup()


class DrainingRunner(web.AppRunner):
    """An AppRunner whose shutdown waits (up to the grace period) for requests in flight.

    `runner.cleanup()` first stops the sites (the listening socket closes: new connections are
    refused) and closes idle keep-alive connections, then calls `shutdown()` (this), then closes
    what is left. aiohttp's own wait there uses `shutdown_timeout` twice per connection (for the
    handler, then for its cancellation), so a 30 s timeout could hold a stuck request for 60 s;
    here the grace period is waited once, and the rest is cut quickly and counted.
    """

    __slots__ = ("_grace", "cut")

    def __init__(self, app: web.Application, *, grace: float, **kwargs: object) -> None:
        super().__init__(app, shutdown_timeout=CUT_TIMEOUT_S, **kwargs)  # type: ignore[arg-type]
        self._grace = grace
        self.cut = 0  # requests still running when the grace period ended

    async def shutdown(self) -> None:
        await super().shutdown()  # on_shutdown: long-lived streams (/events) end here
        routes = self.app[MONITOR].routes
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._grace
        # polled: an Event would put a check on every request's hot path for the sake of shutdown
        while routes.in_flight > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        self.cut = routes.in_flight
        if self.cut:
            log.warning(
                "grace period (%.1fs) over: closing %d requests still running",
                self._grace,
                self.cut,
            )
        else:
            log.info("drained: every request in flight finished in %.2fs", loop.time() - started)


def _fd_soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


async def start_server(settings: Settings, *, reuse_port: bool = False) -> RunningServer:
    """Start the app on a real socket (port 0 picks a free port); return once it accepts."""
    app = create_app(settings)
    runner = DrainingRunner(
        app,
        grace=settings.grace,
        handle_signals=False,
        keepalive_timeout=settings.keepalive_timeout,
        # a client that hangs up cancels its handler (aiohttp's default lets it run to the end)
        handler_cancellation=True,
    )
    await runner.setup()
    sock: socket.socket | None = None
    try:
        server = runner.server
        assert server is not None
        monitor = app[MONITOR]
        sock = listen_socket(settings.host, settings.port, settings.backlog, reuse_port)
        fd_limit = _fd_soft_limit()
        max_connections = settings.max_connections or connection_limit(fd_limit, open_fds())
        monitor.accept.configure(fd_limit, max_connections)
        monitor.accept.install(asyncio.get_running_loop())
        guard = ConnectionGuard(
            server,
            monitor.accept,
            monitor.connections,
            header_timeout=settings.header_timeout,
            max_connections=max_connections,
            max_body_size=settings.max_body_size,
            linger_slots=fd_reserve(fd_limit) // 2,
        )
        await GuardedSite(runner, sock, guard, settings.backlog).start()
    except BaseException:
        if sock is not None:
            sock.close()
        await runner.cleanup()
        raise
    host, port = sock.getsockname()[:2]
    return RunningServer(app, runner, str(host), int(port))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve_until_signalled(settings: Settings, *, reuse_port: bool = False) -> None:
    server = await start_server(settings, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cap = somaxconn()
    log.info(
        "serving on %s (loop=%s, pid=%d, backlog=%d%s)",
        server.url,
        server.app[MONITOR].loop,
        os.getpid(),
        settings.backlog,
        f", kernel caps it at somaxconn={cap}"
        if cap is not None and cap < settings.backlog
        else "",
    )
    if not is_loopback(server.host):
        log.warning(
            "listening on %s, reachable beyond this machine: anyone who can connect can stall "
            "the loop with /block or burn CPU with /cpu (--disable-blocking turns both off)",
            server.host,
        )
    await stop.wait()
    in_flight = server.app[MONITOR].routes.in_flight
    log.info(
        "draining: %d requests in flight, up to %.1fs grace; new connections are refused",
        in_flight,
        settings.grace,
    )
    await server.stop()
    cut = server.runner.cut if isinstance(server.runner, DrainingRunner) else 0
    log.info("stopped (pid %d): %d requests cut at the end of the grace period", os.getpid(), cut)


def run_one(settings: Settings, *, reuse_port: bool = False) -> None:
    """Run one server process on the chosen loop until SIGTERM/SIGINT."""
    with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
        runner.run(serve_until_signalled(settings, reuse_port=reuse_port))


def _worker_main(settings: Settings, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit(settings.backlog)
    run_one(settings, reuse_port=True)


def run_workers(settings: Settings) -> int:
    """N processes sharing one port via SO_REUSEPORT; the kernel spreads connections over them."""
    placeholder = None
    if settings.port == 0:
        # every worker must bind the same port: reserve one (bound, never listening) first
        placeholder = listen_socket(settings.host, 0, 1, reuse_port=True, listen=False)
        settings = replace(settings, port=placeholder.getsockname()[1])
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(settings, logging.getLogger().level),
            name=f"looplab-worker-{i}",
        )
        for i in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    if placeholder is not None:
        placeholder.close()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    codes = [worker.exitcode for worker in workers]
    log.info("workers exited with %s", codes)
    return 0 if all(code == 0 for code in codes) else 1


def serve(settings: Settings) -> int:
    raise_fd_limit(settings.backlog)
    if settings.workers > 1:
        return run_workers(settings)
    run_one(settings)
    return 0
