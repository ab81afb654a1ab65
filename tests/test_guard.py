"""The connection guard (app/guard.py) on real sockets, and the private aiohttp parts it relies on.

The guard subclasses aiohttp's RequestHandler and reads some of its private state to stay off the
per-request path. These tests exercise each duty on keep-alive connections (where that state
matters most), so an aiohttp upgrade that changes those internals fails here, loudly.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp.web_response
import pytest
from aiohttp import web
from aiohttp.web_request import BaseRequest

from app import awaiting
from app.guard import PRIVATE_NAMES, SERVER_NAME, GuardedConnection, check_private_names
from app.launch import running_server
from app.loops import LoopName
from tests.reliability_support import parse_response, request_bytes

HEADER_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 3.0
MAX_BODY = 1024


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response from a keep-alive connection: head, then exactly Content-Length bytes."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, headers, _ = parse_response(head)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


@pytest.fixture
def guarded(loop_name: LoopName) -> Iterator[int]:
    with running_server(
        loop_name,
        header_timeout=HEADER_TIMEOUT,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        max_body_size=MAX_BODY,
    ) as running:
        assert running.server is not None
        yield running.server.port


async def test_connections_are_served_by_the_guarded_handler(loop_name: LoopName) -> None:
    """Every accepted connection is a GuardedConnection (aiohttp's RequestHandler subclassed),
    and this aiohttp still has every private part the guard uses."""
    with running_server(loop_name) as running:
        assert running.server is not None
        server = running.server.runner.server
        assert server is not None
        check_private_names(server)
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(_get("/healthz"))
        assert (await _read_response(reader))[0] == 200
        handlers = server.connections
        writer.close()
    assert handlers
    assert all(isinstance(h, GuardedConnection) for h in handlers)
    assert all(isinstance(h, web.RequestHandler) for h in handlers)


async def _hello(_request: BaseRequest) -> web.StreamResponse:
    return web.Response()


def test_missing_aiohttp_internals_stop_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """If an aiohttp upgrade drops a private part the guard uses, building the guard fails with
    an error that names it, instead of the guard silently not guarding."""
    loop = asyncio.new_event_loop()
    try:
        server = web.Server(_hello, loop=loop)
        check_private_names(server)
        monkeypatch.delattr(aiohttp.web_response, "SERVER_SOFTWARE")
        monkeypatch.delattr(server, "_kwargs")
        monkeypatch.setattr(web.BaseSite, "__slots__", ("_runner",))
        with pytest.raises(
            RuntimeError, match=r"Server\._kwargs.*BaseSite\._server.*SERVER_SOFTWARE"
        ):
            check_private_names(server)
    finally:
        loop.close()


def test_private_names_are_the_only_ones_in_app() -> None:
    """Outside app/guard.py no module of app/ uses a private name of another object.

    `self._x` (an object's own state) is not what this looks for; `other._x` is, and so is any
    name of PRIVATE_NAMES. `sys._current_frames` (the watchdog's view of the loop thread's stack,
    off the request path) is documented in the `sys` module's reference, so it may stay."""
    documented = {"sys._current_frames"}
    listed = "|".join(re.escape(name) for _, name, _ in PRIVATE_NAMES)
    foreign = re.compile(
        rf"\b(?!self\b|cls\b)[A-Za-z_][A-Za-z0-9_]*\.(_[a-z][A-Za-z0-9_]*)\b|\.({listed})\b"
    )
    root = Path(__file__).resolve().parent.parent / "app"
    found = [
        f"{path.relative_to(root)}:{number}: {match.group(0)}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "guard.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in foreign.finditer(line.split("#", 1)[0])
        if match.group(0) not in documented
    ]
    assert found == []


async def test_server_header_hides_versions(guarded: int) -> None:
    """Responses say `Server: loop-lab` (200, 404, aiohttp's own 400), never Python's or
    aiohttp's version."""
    for raw in (
        _get("/healthz", "Connection: close\r\n"),
        _get("/no-such-page", "Connection: close\r\n"),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
        writer.write(raw)
        status, headers, _ = parse_response(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        assert status in (200, 404, 400)
        assert headers["server"] == SERVER_NAME, (status, headers)
    assert "aiohttp" not in vars(aiohttp.web_response)["SERVER_SOFTWARE"]


async def test_body_bound_and_connect_on_keepalive_connections(guarded: int) -> None:
    """On one keep-alive connection: a plain GET, then a too-large Content-Length gets the JSON
    413 (HTTP/1.1) without reaching the app; pipelined behind a GET it is answered in order;
    a small body passes; CONNECT gets 405 after a GET."""
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    writer.write(_get("/healthz"))
    assert (await _read_response(reader))[0] == 200
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert (await _read_response(reader))[0] == 200  # a small body is fine
    writer.write(_get("/healthz"))
    assert (await _read_response(reader))[0] == 200
    writer.write(
        f"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 413 ")  # not aiohttp's HTTP/1.0 error answer
    status, headers, _ = parse_response(head)
    body = json.loads(await reader.readexactly(int(headers["content-length"])))
    assert body["param"] == "Content-Length"
    assert str(MAX_BODY) in body["allowed"]
    writer.close()

    # pipelined in one write: the GET is answered first, then the 413
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    huge = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    writer.write(_get("/healthz") + huge)
    assert (await _read_response(reader))[0] == 200
    assert (await _read_response(reader))[0] == 413
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    writer.write(_get("/healthz"))
    assert (await _read_response(reader))[0] == 200
    writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    status, headers, raw = await _read_response(reader)
    writer.close()
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(raw)["param"] == "method"


async def test_header_timeout_rearms_for_a_later_request(guarded: int) -> None:
    """After a complete request, the next request's first byte starts a new header timer: a
    stalled second head is answered 408 and closed after the header timeout, well before the
    keep-alive timeout; a head split over two writes in time is served and not cut."""
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    writer.write(_get("/healthz"))
    assert (await _read_response(reader))[0] == 200
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")
    started = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), KEEPALIVE_TIMEOUT + 5)
    took = time.monotonic() - started
    writer.close()
    assert parse_response(rest)[0] == 408
    assert HEADER_TIMEOUT * 0.9 <= took < KEEPALIVE_TIMEOUT, took

    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await asyncio.sleep(HEADER_TIMEOUT / 5)  # the client's pause between its two writes
    writer.write(b"Host: x\r\n\r\n")
    assert (await _read_response(reader))[0] == 200
    # idle now: the header timer must not cut it; the keep-alive timer closes it, without a 408
    started = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), KEEPALIVE_TIMEOUT + 5)
    took = time.monotonic() - started
    writer.close()
    assert rest == b""
    assert took >= KEEPALIVE_TIMEOUT * 0.9, took


async def test_unexpected_error_is_json_on_keepalive(
    loop_name: LoopName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler's unexpected exception (here an OSError, which the old guard let through to
    aiohttp's text 500) becomes the bare JSON 500 and closes the connection."""

    def explode(*_args: object, **_kwargs: object) -> None:
        raise FileNotFoundError("secret-internal-detail")

    monkeypatch.setattr(awaiting, "demo_response", explode)
    with running_server(loop_name) as running:
        assert running.server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(request_bytes("/await?delay=0", keep_alive=True))
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    status, headers, body = parse_response(raw)
    assert status == 500
    assert headers["connection"] == "close"
    assert json.loads(body) == {"error": "internal server error"}
    assert b"secret-internal-detail" not in raw
