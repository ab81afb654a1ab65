"""What plain aiohttp does where loop-lab's reliability limits step in: the contrasts in
docs/reliability.md, measured on loopback.

1. EMFILE: a bare aiohttp server and loop-lab, each under `ulimit -n 256`, flooded with 600
   connections while 10 keep-alive clients keep asking; per loop: outcomes, log volume, recovery.
2. Drain: a request that outlives the grace period; plain AppRunner(shutdown_timeout=G) vs
   loop-lab's DrainingRunner: how long cleanup() takes.
3. Client aborts: 200 clients hang up mid-/await?delay=3; how long their handlers stay in flight
   with aiohttp's default (handler_cancellation=False) and with loop-lab's setting.

    flock /tmp/looplab-bench.lock .venv/bin/python scripts/reliability_contrasts.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.reliability_support, when run as a script

from app.application import create_app  # noqa: E402
from app.config import Settings  # noqa: E402
from app.keys import MONITOR  # noqa: E402
from app.launch import ServerProcess, eventually  # noqa: E402
from app.loops import LOOP_NAMES  # noqa: E402
from app.monitor.process import raise_nofile_limit  # noqa: E402
from app.monitor.route_stats import RouteStats  # noqa: E402
from app.server import DrainingRunner, start_server  # noqa: E402
from tests.reliability_support import http_get, parse_response, request_bytes  # noqa: E402

NOFILE = 256
FLOOD = 600
HELD = 10

BARE_SERVER = """
import asyncio, logging, sys
from aiohttp import web
from app.loops import loop_factory
logging.basicConfig(level=logging.INFO)

async def healthz(request):
    return web.Response(text="ok")

async def main():
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    print("serving on http://127.0.0.1:%d" % runner.addresses[0][1], file=sys.stderr, flush=True)
    await asyncio.Event().wait()

with asyncio.Runner(loop_factory=loop_factory(sys.argv[1])) as r:
    r.run(main())
"""


def bare_process(loop: str) -> ServerProcess:
    """The bare aiohttp server above, started as loop-lab is, with the same fd limit."""
    return ServerProcess(command=[sys.executable, "-c", BARE_SERVER, loop], nofile=NOFILE)


async def _flood_client(port: int) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return "connect failed"
    try:
        writer.write(request_bytes("/healthz"))
        raw = await asyncio.wait_for(reader.read(), 3)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "no answer in 3 s"
    finally:
        writer.close()
    return "closed, no answer" if not raw else str(parse_response(raw)[0])


async def _held_request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> str:
    reader, writer = conn
    writer.write(request_bytes("/healthz", keep_alive=True))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        status, headers, _ = parse_response(head)
        await reader.readexactly(int(headers["content-length"]))
        return str(status)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        return type(exc).__name__


async def emfile(server: ServerProcess, label: str) -> dict[str, object]:
    await server.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(HELD)]
        before = Counter([await _held_request(c) for c in held])
        lines_before = len(server.lines)
        flood = await asyncio.gather(*(_flood_client(server.port) for _ in range(FLOOD)))
        during = Counter(await asyncio.gather(*(_held_request(c) for c in held)))

        async def serves() -> bool:
            try:
                return (await http_get(server.port, "/healthz", within=2))[0] == 200
            except (OSError, TimeoutError):
                return False

        try:
            recovered: float | str = round(await eventually(serves, within=20), 2)
        except TimeoutError:
            recovered = "not within 20 s"
        await asyncio.sleep(1)  # let the log catch up
        log = server.lines[lines_before:]
        for _, writer in held:
            writer.close()
    finally:
        await server.stop()
    return {
        "server": label,
        "held keep-alive before": dict(before),
        "flood outcomes": dict(Counter(flood)),
        "held keep-alive during flood": dict(during),
        "new connections served again after (s)": recovered,
        "log lines during flood": len(log),
        "ERROR lines": sum(" ERROR " in line or line.startswith("ERROR") for line in log),
        "tracebacks": sum(line.startswith("Traceback") for line in log),
    }


def in_flight_is(routes: RouteStats, n: int) -> Callable[[], bool]:
    return lambda: routes.in_flight == n


async def drain(grace: float) -> dict[str, float]:
    """A 30 s /await in flight at shutdown: how long cleanup() takes, plain vs draining runner."""
    results = {}
    for label in ("aiohttp AppRunner(shutdown_timeout=grace)", "loop-lab DrainingRunner(grace)"):
        settings = Settings(port=0, grace=grace)
        if label.startswith("aiohttp"):
            app = create_app(settings)
            runner: web.AppRunner = web.AppRunner(app, shutdown_timeout=grace)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
        else:
            running = await start_server(settings)
            runner, app, port = running.runner, running.app, running.port
            assert isinstance(runner, DrainingRunner)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes("/await?delay=30"))
        routes = app[MONITOR].routes
        await eventually(in_flight_is(routes, 1), within=10)
        started = time.monotonic()
        await runner.cleanup()
        results[label] = round(time.monotonic() - started, 2)
        writer.close()
    return results


async def aborts(clients: int = 200, delay: float = 3.0) -> dict[str, float]:
    """Clients hang up mid-/await: seconds until their handlers are no longer in flight."""
    results = {}
    for cancel in (False, True):
        app = create_app(Settings(port=0))
        runner = web.AppRunner(app, handler_cancellation=cancel)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
        for _, writer in conns:
            writer.write(request_bytes(f"/await?delay={delay}"))
        routes = app[MONITOR].routes
        await eventually(in_flight_is(routes, clients), within=10)
        for _, writer in conns:
            writer.close()
        took = await eventually(in_flight_is(routes, 0), within=delay + 10)
        results[f"handler_cancellation={cancel}"] = round(took, 2)
        await runner.cleanup()
    return results


async def main() -> None:
    raise_nofile_limit()
    report: dict[str, object] = {"python": sys.version.split()[0]}
    emfile_runs = []
    for loop in LOOP_NAMES:
        for server, label in (
            (bare_process(loop), f"bare aiohttp, {loop}"),
            (ServerProcess("--loop", loop, nofile=NOFILE), f"loop-lab, {loop}"),
        ):
            emfile_runs.append(await emfile(server, label))
    report["emfile"] = emfile_runs
    report["drain: seconds to stop with a 30 s request in flight, grace 2 s"] = await drain(2.0)
    report["aborts: seconds until 200 aborted /await?delay=3 leave in-flight"] = await aborts()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
