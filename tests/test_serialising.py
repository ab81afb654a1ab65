"""/json on both loops: json.dumps on the loop holds it; in a process it does not."""

from __future__ import annotations

import aiohttp

from app.launch import ServerThread
from tests.loop_contrasts import get_json

BIG = 16_384  # kb: a few hundred ms of encoding


async def test_inline_step_is_the_encoding(server: ServerThread) -> None:
    """Inline, max_step_ms is the whole encoding; in a process, a sliver of it."""
    async with aiohttp.ClientSession() as session:
        inline = await get_json(session, f"{server.url}/json?kb={BIG}&via=inline")
        process = await get_json(session, f"{server.url}/json?kb={BIG}&via=process")
    assert inline["chars"] == process["chars"] >= BIG * 1000
    assert inline["max_step_ms"] > 0.8 * inline["elapsed"] * 1000
    assert process["max_step_ms"] < inline["max_step_ms"] / 10


async def test_thread_holds_the_gil_the_loop_needs(server: ServerThread) -> None:
    """In a thread, json.dumps keeps the GIL: the handler's own step waits for it to finish.

    (No /healthz timing here: the test's client shares the server's process, hence its GIL.)
    """
    async with aiohttp.ClientSession() as session:
        thread = await get_json(session, f"{server.url}/json?kb={BIG}&via=thread")
        process = await get_json(session, f"{server.url}/json?kb={BIG}&via=process")
    assert thread["max_step_ms"] > 5 * process["max_step_ms"]
    assert thread["max_step_ms"] > 0.5 * thread["elapsed"] * 1000
