"""Server RSS per connection: the idle keep-alive connection, and the request parked on it.

Starts `loop-lab serve` on a free loopback port, opens N plain TCP connections to it (waits until
the server's /stats counts them all open), then sends one `GET /await?delay=60` on each (waits
until /stats counts them all in flight), reading the server's RSS at each step. No request ever
completes, so nothing is freed in between: this is the memory of the objects themselves, without
the churn of a load test.

    python scripts/connection_memory.py --loop asyncio --connections 10000
    python scripts/connection_memory.py --where --connections 2000   # what the bytes are

`--where` runs the server in this process instead, under tracemalloc, with the client sockets in
a child process, and prints per connection: the Python bytes and GC-tracked objects an idle
connection and a parked request add, by object type and by the line that allocated them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import linecache
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `app` importable
    sys.path.insert(0, str(ROOT))

from app.launch import SERVING  # noqa: E402
from app.monitor.process import raise_nofile_limit  # noqa: E402

# the child process of `--where`: N sockets, a request on each when told, closed when told
CLIENT = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((host, port)) for _ in range(n)]
print("open", flush=True)
sys.stdin.readline()
for s in socks:
    s.sendall(b"GET /await?delay=600 HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n")
print("sent", flush=True)
sys.stdin.readline()
"""
TOP_SITES = 25
MIN_BYTES = 16  # per connection: smaller allocation sites are left out of the listing


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        data: dict[str, Any] = json.load(response)
        return data


def _settle(url: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(2400):
        current = _get_json(f"{url}/stats")
        if done(current):
            return current
        time.sleep(0.05)  # polling the server's own count, not waiting blind
    raise TimeoutError("the server never reported the expected count")


def _object_types() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )


def _report(label: str, n: int, before: tuple[Any, Any], after: tuple[Any, Any]) -> None:
    """Print what `after` holds beyond `before`, per connection: by type and by allocating line."""
    (types_before, snap_before), (types_after, snap_after) = before, after
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    stats = snap_after.filter_traces(ignore).compare_to(
        snap_before.filter_traces(ignore), "traceback"
    )
    total = sum(stat.size_diff for stat in stats)
    types = types_after.copy()
    types.subtract(types_before)
    tracked = sum(types.values())
    print(
        f"\n{label}: {total / n:,.0f} bytes (tracemalloc) and {tracked / n:.1f} GC-tracked objects"
    )
    print("  tracked objects per connection, by type:")
    for name, count in types.most_common():
        if count / n >= 0.5:
            print(f"    {count / n:5.2f}  {name}")
    print("  bytes per connection, by the allocating line (innermost three frames):")
    grown = sorted((s for s in stats if s.size_diff > 0), key=lambda s: -s.size_diff)
    for stat in grown[:TOP_SITES]:
        if stat.size_diff / n < MIN_BYTES:
            break
        print(f"    {stat.size_diff / n:6.0f} B  {stat.count_diff / n:5.2f} blocks")
        for frame in list(stat.traceback)[-3:]:
            where = "/".join(frame.filename.split("/")[-2:])
            code = linecache.getline(frame.filename, frame.lineno).strip()
            print(f"             {where}:{frame.lineno}  {code[:80]}")


def where(loop_name: str, n: int) -> int:
    """The in-process, tracemalloc version: where an idle connection's and a request's bytes go."""
    from app.config import Settings
    from app.loops import loop_factory
    from app.server import RunningServer, start_server

    settings = Settings(loop=loop_name, port=0, max_delay=1200.0, stall_threshold=60.0)
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        server: RunningServer = await start_server(settings)
        stop = asyncio.Event()
        holder.update(server=server, stop=stop, loop=asyncio.get_running_loop())
        started.set()
        await stop.wait()
        await server.stop()

    def run() -> None:
        with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
            runner.run(serve())

    tracemalloc.start(25)
    thread = threading.Thread(target=run, name="looplab-server", daemon=True)
    thread.start()
    if not started.wait(60):
        print("the server did not start", file=sys.stderr)
        return 1
    url = holder["server"].url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    _settle(url, lambda s: True)
    base = (_object_types(), tracemalloc.take_snapshot())
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, host, port, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        client.stdout.readline()
        _settle(url, lambda s: s["connections"]["open"] >= n + 1)  # + the /stats reader
        idle = (_object_types(), tracemalloc.take_snapshot())
        client.stdin.write("\n")
        client.stdin.flush()
        client.stdout.readline()
        _settle(url, lambda s: s["in_flight"] >= n + 1)  # + this /stats request
        parked = (_object_types(), tracemalloc.take_snapshot())
        print(f"{loop_name}: {n:,} connections, server in this process under tracemalloc")
        _report("idle keep-alive connection", n, base, idle)
        _report("+ the /await request parked on it", n, idle, parked)
    finally:
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(timeout=60)
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(timeout=60)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument(
        "--where", action="store_true", help="tracemalloc breakdown (server in this process)"
    )
    args = parser.parse_args()
    n = args.connections
    raise_nofile_limit()  # the child inherits it too
    if args.where:
        return where(args.loop, n)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--loop",
            args.loop,
            "--port",
            "0",
            "--max-delay",
            "120",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    url = ""
    for line in server.stderr:
        match = SERVING.search(line)
        if match:
            url = match.group(1)
            break
    if not url:
        print("the server did not start", file=sys.stderr)
        return 1

    def stats() -> dict[str, Any]:
        with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
            data: dict[str, Any] = json.load(response)
            return data

    def settle(done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for _ in range(1200):
            current = stats()
            if done(current):
                return current
            time.sleep(0.05)  # polling the server's own count, not waiting blind
        raise TimeoutError("the server never reported the expected count")

    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        base = stats()["rss_mb"]
        sockets = [socket.create_connection((host, int(port))) for _ in range(n)]
        idle = settle(lambda s: s["connections"]["open"] >= n + 1)["rss_mb"]  # + this one
        for sock in sockets:
            sock.sendall(b"GET /await?delay=60 HTTP/1.1\r\nHost: bench\r\n\r\n")
        parked = settle(lambda s: s["in_flight"] >= n + 1)["rss_mb"]  # + this /stats request
        print(
            f"{args.loop}: {n:,} connections; RSS {base:.1f} MB before; "
            f"idle connection {(idle - base) * 1024 / n:.2f} KB; "
            f"parked /await request {(parked - idle) * 1024 / n:.2f} KB; "
            f"together {(parked - base) * 1024 / n:.2f} KB per connection"
        )
        for sock in sockets:
            sock.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
