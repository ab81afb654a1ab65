"""Security defaults: loopback bind, switchable /block and /cpu, no tracebacks, bounded bodies
(docs/reliability.md, 7)."""

from __future__ import annotations

import asyncio
import json

import pytest

from app import awaiting
from app.config import Settings, build_settings
from app.launch import running_server
from app.loops import LoopName
from tests.reliability_support import http_get, parse_response


def test_defaults_bind_loopback_and_bound_bodies() -> None:
    """With no flags and no env the server binds 127.0.0.1 and bounds request bodies."""
    settings = build_settings({}, {})
    assert settings.host == "127.0.0.1"
    assert settings.max_body_size == Settings().max_body_size <= 1 << 20
    assert settings.disable_blocking is False
    assert build_settings({}, {"LOOP_LAB_DISABLE_BLOCKING": "1"}).disable_blocking is True


async def test_default_bind_is_unreachable_from_other_addresses() -> None:
    """The default server answers on 127.0.0.1 and refuses a connection to another address."""
    with running_server("asyncio") as running:
        assert running.server is not None
        port = running.server.port
        assert (await http_get(port, "/healthz"))[0] == 200
        # 127.0.0.2 is this machine too (all of 127/8 is loopback), but not the bound address
        with pytest.raises(ConnectionRefusedError):
            await http_get(port, "/healthz", host="127.0.0.2")


async def test_disable_blocking_refuses_block_and_cpu(loop_name: LoopName) -> None:
    """--disable-blocking: /block and /cpu (every `via`) answer 403 with a JSON reason; the
    non-blocking endpoints still work."""
    with running_server(loop_name, disable_blocking=True) as running:
        assert running.server is not None
        port = running.server.port
        for path in ("/block?delay=5", "/cpu", "/cpu?via=process", "/cpu?via=thread"):
            status, headers, body = await http_get(port, path)
            assert status == 403, path
            assert headers["content-type"].startswith("application/json")
            reason = json.loads(body)
            assert set(reason) == {"error", "param", "allowed"}
            assert "disable-blocking" in reason["allowed"]
        for path in ("/await?delay=0", "/offload?delay=0"):
            assert (await http_get(port, path))[0] == 200


async def test_no_traceback_in_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error answers a bare JSON 500, even with asyncio debug mode on (where
    aiohttp would print the traceback into the response)."""

    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(awaiting, "demo_response", explode)
    monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")  # the loop, and so aiohttp, run in debug mode
    with running_server("asyncio", debug=True) as running:
        assert running.server is not None
        for accept in ("text/html", "*/*"):
            status, _, body = parse_response(await _raw(running.server.port, accept))
            assert status == 500
            assert json.loads(body) == {"error": "internal server error"}
            assert b"secret-internal-detail" not in body
            assert b"Traceback" not in body
        assert (await http_get(running.server.port, "/healthz"))[0] == 200


async def _raw(port: int, accept: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /await?delay=0 HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    return data


async def test_large_declared_body_gets_413() -> None:
    """A Content-Length above --max-body-size is answered 413 (JSON) before any handler runs."""
    with running_server("asyncio", max_body_size=1024) as running:
        assert running.server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\nConnection: close\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers, _ = parse_response(head)
        body = await reader.readexactly(int(headers["content-length"]))
        writer.close()
        assert status == 413
        assert json.loads(body)["param"] == "Content-Length"
        # a small body is fine
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
