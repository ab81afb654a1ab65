"""Hostile input against every route the app has: only 200/400/405/413/431, never a 500, and the
server stays up (docs/reliability.md, 6)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.application import create_app
from app.config import Settings
from app.keys import MONITOR
from app.launch import ServerThread, running_server

ALLOWED = {200, 400, 405, 413, 431}
PARAMS = [
    "delay",
    "n",
    "pool",
    "via",
    "driver",
    "client",
    "kb",
]  # every parameter an endpoint reads, plus noise below


def _routes() -> list[str]:
    """Every plain path the app serves, read from its router (so new routes get fuzzed too)."""
    app = create_app(Settings())
    paths = {
        info["path"]
        for resource in app.router.resources()
        if "path" in (info := resource.get_info())
    }
    return sorted(paths)


ROUTES = _routes()

# ASCII, Arabic-Indic, fullwidth, superscript digits and a vulgar fraction: int() takes several
UNICODE_DIGITS = "0123456789" + "".join(
    chr(c) for c in [*range(0x660, 0x66A), *range(0xFF10, 0xFF1A), 0xB9, 0xB2, 0xB3, 0xBD]
)
unicode_digits = st.text(alphabet=UNICODE_DIGITS, max_size=6)
numbers = st.one_of(
    st.integers(-10, 5000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e3", "0x10", "+1", "-0", "1_000", " 1", "1 ", ".", "0.", "nan", "inf"]),
)
junk = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["%00", "\x00", "a%00b", "%ff", "%", "%%", "thread\x00", "process%00"]),
    st.text(alphabet="ab%", min_size=2000, max_size=9000),  # huge: past aiohttp's line limit
)
choices = st.sampled_from(
    ["thread", "process", "inline", "sync", "offload", "async", "requests", "aiohttp"]
)
value = st.one_of(numbers, unicode_digits, junk, choices)
name = st.one_of(st.sampled_from(PARAMS), st.text(max_size=8))
query = st.lists(st.tuples(name, value), max_size=6)  # names repeat freely: ?delay=1&delay=2


def _encode(pairs: list[tuple[str, str]], raw: bool) -> str:
    if raw:  # what a hand-written client or a scanner sends: not percent-encoded at all
        return "&".join(f"{k}={v}" for k, v in pairs)
    return "&".join(f"{quote(k, safe='%')}={quote(v, safe='%')}" for k, v in pairs)


def _send(port: int, request: bytes) -> int:
    """Send raw bytes, read only the status line (streams like /events never end), close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"closed without a status line for {request[:120]!r}")
            head += chunk
    return int(head.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    """One server for the whole module, with delays bounded so valid requests stay quick."""
    with running_server("asyncio", max_delay=0.01) as running:
        yield running


def _port(running: ServerThread) -> int:
    assert running.server is not None
    return running.server.port


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(ROUTES),
    pairs=query,
    raw=st.booleans(),
)
def test_query_strings(
    fuzz_server: ServerThread, route: str, pairs: list[tuple[str, str]], raw: bool
) -> None:
    """Any query string on any route: repeated, unicode, NUL, huge, malformed — no 5xx."""
    target = f"{route}?{_encode(pairs, raw)}" if pairs else route
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status = _send(_port(fuzz_server), request.encode("utf-8", "surrogatepass"))
    assert status in ALLOWED, (target[:200], status)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(ROUTES),
    method=st.one_of(
        st.sampled_from(["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "HEAD"]),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!", min_size=1, max_size=12),
    ),
    header=st.one_of(
        st.none(),
        st.tuples(st.just("X-Big"), st.integers(1, 20_000).map(lambda n: "v" * n)),
        st.tuples(st.just("Content-Length"), st.integers(0, 10**12).map(str)),
        st.tuples(st.text(max_size=10), st.text(max_size=40)),
    ),
    many_headers=st.integers(0, 200),
)
def test_methods_and_headers(
    fuzz_server: ServerThread,
    route: str,
    method: str,
    header: tuple[str, str] | None,
    many_headers: int,
) -> None:
    """Other methods, oversized or odd headers, too many headers, huge Content-Length: no 5xx."""
    lines = [f"{method} {route} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"X-H{i}: {i}" for i in range(many_headers)]
    if header is not None:
        lines.append(f"{header[0]}: {header[1]}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    status = _send(_port(fuzz_server), request)
    assert status in ALLOWED, (method, route, header and header[0], many_headers, status)


def test_server_survived_the_fuzzing(fuzz_server: ServerThread) -> None:
    """After the fuzzing: /healthz answers, and no route ever counted a 5xx."""
    assert _send(_port(fuzz_server), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200
    assert fuzz_server.server is not None
    routes = fuzz_server.server.app[MONITOR].routes.as_dict()
    assert routes, "the fuzz tests above did not run"
    assert {route: r["errors"] for route, r in routes.items() if r["errors"]} == {}
