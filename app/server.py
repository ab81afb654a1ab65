"""Serving: listen socket and backlog, fd limit, SO_REUSEPORT workers, graceful drain on signals."""

from __future__ import annotations

import asyncio
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
from app.keys import MONITOR
from app.loops import loop_factory

log = logging.getLogger("loop_lab")

TARGET_CONNECTIONS = 10_000  # what the multiplex scenario holds open
FD_HEADROOM = 256  # pools, logs, pipes, the listening socket, the watchdog...


def raise_fd_limit(backlog: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; warn if 10k connections will not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE to %d: %s", target, exc)
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


async def start_server(settings: Settings, *, reuse_port: bool = False) -> RunningServer:
    """Start the app on a real socket (port 0 picks a free port); return once it accepts."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        shutdown_timeout=settings.grace,
        handle_signals=False,
    )
    await runner.setup()
    sock: socket.socket | None = None
    try:
        assert runner.server is not None
        app[MONITOR].connections.attach(runner.server)
        sock = listen_socket(settings.host, settings.port, settings.backlog, reuse_port)
        await web.SockSite(runner, sock, backlog=settings.backlog).start()
    except BaseException:
        if sock is not None:
            sock.close()
        await runner.cleanup()
        raise
    host, port = sock.getsockname()[:2]
    return RunningServer(app, runner, str(host), int(port))


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
    await stop.wait()
    in_flight = server.app[MONITOR].routes.in_flight
    log.info("draining: %d requests in flight, up to %.1fs grace", in_flight, settings.grace)
    await server.stop()
    log.info("stopped cleanly (pid %d)", os.getpid())


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
