"""File-descriptor exhaustion under a low `ulimit -n` (docs/reliability.md, 5)."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import pytest

from app.launch import ServerProcess, eventually
from app.loops import LoopName
from app.monitor.process import raise_nofile_limit
from tests.reliability_support import http_get, parse_response, request_bytes

pytestmark = pytest.mark.slow

NOFILE = 256
HELD = 10
FLOOD = 600


class KeepAlive:
    """One keep-alive connection that sends requests one after another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(request_bytes(path, keep_alive=True))
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status, headers, _ = parse_response(head)
        body = await self.reader.readexactly(int(headers["content-length"]))
        return status, body


async def _flood_client(port: int) -> str:
    """Connect, ask, and classify what happens within a few seconds."""
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
        return "waiting"  # accepted by the kernel, never by the server (yet)
    finally:
        writer.close()
    if not raw:
        return "closed"
    return str(parse_response(raw)[0])


async def test_fd_exhaustion_is_survived_and_reported(loop_name: LoopName) -> None:
    """Under `ulimit -n 256`, a flood of 600 connections: one clear log line, the connections
    already open keep being served, /stats and /metrics show it, and it serves again after."""
    raise_nofile_limit()
    server = await ServerProcess("--loop", loop_name, nofile=NOFILE).start()
    try:
        held = [await KeepAlive.open(server.port) for _ in range(HELD)]
        for conn in held:
            assert (await conn.get("/healthz"))[0] == 200

        outcomes = Counter(
            await asyncio.gather(*(_flood_client(server.port) for _ in range(FLOOD)))
        )
        # the connections it already had were served all along
        during = [await conn.get("/healthz") for conn in held]
        stats = json.loads((await held[0].get("/stats"))[1])
        metrics = (await held[1].get("/metrics"))[1].decode()
        accept = stats["accept"]

        async def serves_new_connections() -> bool:
            try:
                return (await http_get(server.port, "/healthz", within=2))[0] == 200
            except (OSError, TimeoutError):
                return False

        recovered_after = await eventually(serves_new_connections, within=30, what="recovery")
        for conn in held:
            conn.writer.close()
    finally:
        await server.stop()

    assert outcomes["200"] > 0
    assert len(outcomes) > 1, outcomes  # not everybody was served: the limit was real
    assert during == [(200, b"ok")] * HELD
    assert accept["fd_limit"] == NOFILE
    assert accept["refused"] + accept["accept_errors"] > 0
    assert accept["episodes"] >= 1
    refused_metric = re.search(r"^looplab_refused_connections_total (\S+)$", metrics, re.M)
    assert refused_metric is not None
    assert float(refused_metric.group(1)) == accept["refused"]
    assert re.search(r"^looplab_accept_errors_total\{errno=", metrics, re.M)
    trouble = [
        line for line in server.lines if " ERROR " in line or "Traceback" in line or "WARN" in line
    ]
    errors = [line for line in trouble if " ERROR " in line]
    assert len(errors) == 1, "\n".join(trouble)
    assert "Traceback" not in server.log
    print(
        f"\n[{loop_name}] ulimit -n {NOFILE}, {FLOOD} clients: {dict(outcomes)}; "
        f"accept {accept}; new connections served again after {recovered_after:.2f}s\n"
        f"  log: {errors[0]}"
    )
