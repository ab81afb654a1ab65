"""Helpers for the reliability tests: raw HTTP on sockets, and what a server process holds.

The server itself is started with app.launch.ServerProcess.

Raw asyncio sockets keep thousands of clients cheap and let a test do what real clients do and
client libraries hide: stop halfway through a request line, hang up mid-request, read only a
status line.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from app.monitor.process import rss_bytes


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def request_bytes(path: str, *, method: str = "GET", keep_alive: bool = False) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: {connection}\r\n\r\n".encode()
    )


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def http_get(
    port: int, path: str, *, within: float = 30.0, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (Connection: close); status, headers, body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    try:
        writer.write(request_bytes(path))
        raw = await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
    return parse_response(raw)


async def get_json(port: int, path: str) -> Any:
    status, _, body = await http_get(port, path)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)
