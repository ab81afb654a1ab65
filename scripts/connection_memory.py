"""Server RSS per connection: the idle keep-alive connection, and the request parked on it.

Starts `loop-lab serve` on a free loopback port, opens N plain TCP connections to it (waits until
the server's /stats counts them all open), then sends one `GET /await?delay=60` on each (waits
until /stats counts them all in flight), reading the server's RSS at each step. No request ever
completes, so nothing is freed in between: this is the memory of the objects themselves, without
the churn of a load test.

    python scripts/connection_memory.py --loop asyncio --connections 10000
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    n = args.connections
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the child inherits it too
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
        match = re.search(r"serving on (http://\S+)", line)
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
