"""Bare aiohttp reference server for the overhead benchmark: the same work, no instrumentation.

It deliberately imports nothing from `app/`: it is what a handler costs with no monitor, no
middleware and no metrics, so `scripts/overhead.py` can put loop-lab next to it in the same run.

- `/healthz` answers `ok` as plain text, like loop-lab's.
- `/await?delay=S` parses `delay` as strictly as loop-lab does (one plain ASCII decimal within
  bounds, else a 400 JSON error), awaits `asyncio.sleep(delay)` and returns a JSON body with the
  same keys. `max_step_ms` is 0.0: there is no step profiler here; the key keeps the bodies the
  same size.

With `--otel` the same app runs under OpenTelemetry's aiohttp server instrumentation, set up as
its documentation says (`AioHttpServerInstrumentor().instrument()` before the app is made), with
traces and metrics on and kept in memory: the SDK's cost per request, no exporter's network.

Run: `python scripts/bare_server.py --loop uvloop --port 0 [--otel]`; it prints `listening on URL`
once it accepts connections and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from time import perf_counter

from aiohttp import web

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z", re.ASCII)
_MAX_LEN = 32
LOOP_KEY = web.AppKey("loop", str)
MAX_DELAY_KEY = web.AppKey("max_delay", float)


def _bad(param: str, allowed: str, error: str) -> web.HTTPBadRequest:
    body = {"error": error, "param": param, "allowed": allowed}
    return web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")


def parse_delay(request: web.Request, default: float) -> float:
    hi = request.app[MAX_DELAY_KEY]
    allowed = f"0 <= delay <= {hi:g} (seconds, plain decimal)"
    values = request.query.getall("delay", [])
    if not values:
        return min(default, hi)
    if len(values) > 1:
        raise _bad("delay", allowed, f"delay given {len(values)} times; give it once")
    raw = values[0]
    if len(raw) > _MAX_LEN or not _DECIMAL.match(raw):
        raise _bad("delay", allowed, f"delay must be a plain decimal number, got {raw[:32]!r}")
    value = float(raw)
    if not 0.0 <= value <= hi:
        raise _bad("delay", allowed, f"delay={raw} is out of range")
    return value


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def await_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    delay = parse_delay(request, default=0.1)
    await asyncio.sleep(delay)
    body = {
        "mode": "await",
        "delay": delay,
        "elapsed": round(perf_counter() - started, 6),
        "loop": request.app[LOOP_KEY],
        "pid": os.getpid(),
        "max_step_ms": 0.0,
    }
    return web.json_response(body)


def instrument_with_opentelemetry() -> None:
    """Traces and metrics on, both kept in memory (`pip install loop-lab[bench]`)."""
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    AioHttpServerInstrumentor().instrument()  # from now on web.Application is instrumented


def create_app(loop_name: str, max_delay: float) -> web.Application:
    app = web.Application()
    app[LOOP_KEY] = loop_name
    app[MAX_DELAY_KEY] = max_delay
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/await", await_handler)
    return app


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen ourselves (as loop-lab does), so port 0's pick is known before serving."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def serve(host: str, port: int, loop_name: str, backlog: int, max_delay: float) -> None:
    runner = web.AppRunner(create_app(loop_name, max_delay), access_log=None, handle_signals=False)
    await runner.setup()
    sock = listen_socket(host, port, backlog)
    bound_host, bound_port = sock.getsockname()[:2]
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"listening on http://{shown}:{bound_port} (loop={loop_name})", flush=True)
    await stop.wait()
    await runner.cleanup()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--max-delay", type=float, default=60.0)
    parser.add_argument("--otel", action="store_true", help="OpenTelemetry instrumentation on")
    args = parser.parse_args(argv)
    if args.otel:
        instrument_with_opentelemetry()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.host, args.port, args.loop, args.backlog, args.max_delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
