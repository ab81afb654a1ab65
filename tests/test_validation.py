"""Bad input is a 400 JSON error naming the parameter and the bound, never a 500."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.launch import ServerThread, running_server

BAD_DELAYS = [
    "abc",
    "",
    "-1",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "0x10",
    "1e3",
    "61",
    "1,5",
    "\u0661",
    " 1",
]
BAD_CASES = [
    *[("/await", f"delay={quote(v)}", "delay") for v in BAD_DELAYS],
    *[("/block", f"delay={quote(v)}", "delay") for v in ("-0.1", "nan", "99999")],
    ("/offload", "pool=gpu", "pool"),
    ("/offload", "delay=inf&pool=thread", "delay"),
    ("/cpu", "via=gpu", "via"),
    ("/cpu", "n=0", "n"),
    ("/cpu", "n=100000000000", "n"),
    ("/cpu", "n=1.5", "n"),
    ("/gather", "n=1000000", "n"),
    ("/gather", "n=-3", "n"),
    ("/threadsafe", "delay=1e999", "delay"),
    ("/await", "delay=1&delay=2", "delay"),
    ("/await", "delay=" + "9" * 5000, "delay"),
    ("/db", "driver=mysql", "driver"),
    ("/db", "driver=sync&delay=nan", "delay"),
    ("/db", "driver=async&delay=61", "delay"),
    ("/upstream", "client=curl", "client"),
    ("/upstream", "client=requests&delay=-1", "delay"),
    ("/upstream", "client=aiohttp&delay=1e3", "delay"),
    ("/resolve", "n=0", "n"),
    ("/resolve", "n=1001", "n"),
    ("/resolve", "n=ten", "n"),
    ("/json", "kb=0", "kb"),
    ("/json", "kb=16385", "kb"),
    ("/json", "kb=1.5", "kb"),
    ("/json", "via=gpu", "via"),
]


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def quick_server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """One server per loop for the module, with short delays so valid fuzz input stays fast."""
    with running_server(request.param, max_delay=0.05) as server:
        yield server


def _get(server: ServerThread, target: str) -> tuple[int, bytes]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "query", "param"), BAD_CASES)
def test_bad_input_is_a_400_naming_the_parameter(
    quick_server: ServerThread, path: str, query: str, param: str
) -> None:
    """Each bad value gets 400 with JSON error/param/allowed naming the parameter and bound."""
    status, body = _get(quick_server, f"{path}?{query}")
    assert status == 400, body[:200]
    error = json.loads(body)
    assert error["param"] == param
    assert error["error"]
    assert error["allowed"]
    assert len(body) < 1000  # a huge input is not echoed back in full


def test_allowed_names_the_bound(quick_server: ServerThread) -> None:
    """The `allowed` field states the configured max delay."""
    _, body = _get(quick_server, "/await?delay=5")
    assert json.loads(body)["allowed"].startswith("0 <= delay <= 0.05")


def test_valid_edges_are_accepted(quick_server: ServerThread) -> None:
    """The bounds themselves are valid: delay=0, delay=max, n=1, '.05'."""
    for target in ("/await?delay=0", "/await?delay=0.05", "/await?delay=.05", "/cpu?n=1"):
        status, body = _get(quick_server, target)
        assert status == 200, (target, body)


PARAM_NAMES = st.sampled_from(
    ["delay", "pool", "via", "n", "driver", "client", "kb", "x", "", "delay[]"]
)
ENDPOINTS = st.sampled_from(
    [
        "/await",
        "/block",
        "/offload",
        "/cpu",
        "/gather",
        "/threadsafe",
        "/schedule",
        "/healthz",
        "/db",
        "/upstream",
        "/resolve",
        "/json",
    ]
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    path=ENDPOINTS,
    pairs=st.lists(st.tuples(PARAM_NAMES, st.text(max_size=40)), max_size=4),
)
def test_fuzzed_queries_get_only_200_or_400(
    quick_server: ServerThread, path: str, pairs: list[tuple[str, str]]
) -> None:
    """Any query string on any demo endpoint answers 200 or 400, never a 500."""
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    status, body = _get(quick_server, f"{path}?{query}")
    assert status in (200, 400), (path, query, status, body[:300])
    if status == 400:
        assert set(json.loads(body)) == {"error", "param", "allowed"}
