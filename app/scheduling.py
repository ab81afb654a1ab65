"""`/schedule`: the order the running loop really runs call_soon, create_task, call_later(0),
call_at(now) and an I/O callback that are all ready at once, with the loop time of each.

Everything is registered from one handler step, with the socket already readable, so all five are
runnable on the loop's next turn. What order they then run in is the loop's own policy, and it is
not the same on asyncio and uvloop. The registration order deliberately puts call_soon last.
"""

from __future__ import annotations

import asyncio
import socket
from time import perf_counter
from typing import Any

from aiohttp import web

from app.responses import demo_response

routes = web.RouteTableDef()

REGISTRATION_ORDER = (
    "I/O callback (add_reader)",
    "call_later(0)",
    "call_at(loop.time())",
    "create_task",
    "call_soon",
)


@routes.get("/schedule")
async def schedule_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    loop = asyncio.get_running_loop()
    ran: list[dict[str, Any]] = []
    all_ran = loop.create_future()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    registered_at = loop.time()

    def record(name: str) -> None:
        now = loop.time()
        ran.append(
            {
                "order": len(ran) + 1,
                "callback": name,
                "loop_time": round(now, 6),
                "after_registration_ms": round((now - registered_at) * 1000, 3),
            }
        )
        if len(ran) == len(REGISTRATION_ORDER) and not all_ran.done():
            all_ran.set_result(None)

    def on_readable() -> None:
        loop.remove_reader(reader.fileno())
        reader.recv(16)
        record(REGISTRATION_ORDER[0])

    async def task_body() -> None:
        record(REGISTRATION_ORDER[3])

    try:
        writer.send(b"!")  # readable before anything is registered: due at the very next poll
        registered_at = loop.time()
        loop.add_reader(reader.fileno(), on_readable)
        loop.call_later(0, record, REGISTRATION_ORDER[1])
        loop.call_at(loop.time(), record, REGISTRATION_ORDER[2])
        task = asyncio.create_task(task_body())
        loop.call_soon(record, REGISTRATION_ORDER[4])
        await asyncio.wait_for(all_ran, timeout=5.0)
        await task
    finally:
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()
    return demo_response(
        request,
        "schedule",
        started,
        registered_at=round(registered_at, 6),
        registration_order=list(REGISTRATION_ORDER),
        ran=ran,
        clock="loop.time() is the loop's own monotonic clock, not wall time",
    )
