"""`/tasks`: every live task of the loop, grouped by the source line it is suspended at.

A suspended task's coroutine points at what it awaits (`cr_await`), that at what it awaits, and
so on down to a future; the innermost frame of the project's own code on that chain is the line
the task waits at (`app/awaiting.py:21 await asyncio.sleep(delay)`). The metered handler
drives a handler itself instead of awaiting it (app.monitor.metering), so where a generator
awaits nothing the chain continues into the suspended coroutine it holds.

All of it runs in the default executor, the list of tasks included (`asyncio.all_tasks(loop)`
alone takes 6-12 ms at 10,000 tasks on 3.11): the loop keeps serving meanwhile and competes only
for the GIL (figures in docs/utilization.md, "/tasks at 10,000 tasks").

Age: a request's task is as old as its request (its metered handler's `StepRecord.started`); any
other task's age is counted from the first time `/tasks` saw it (kept, with the route or name,
per task for as long as it lives), so for those `oldest_s` is a lower bound.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import threading
import time
import types
import weakref
from collections import Counter
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from aiohttp import web

from app.monitor import frames
from app.monitor.metering import UNMATCHED
from app.monitor.steps import STEPS
from app.params import int_param

routes = web.RouteTableDef()

MAX_DEPTH = 64  # await chains longer than this are cut (a runaway recursion)
MAX_LISTED = 1000  # `?detail=1` lists at most this many tasks (`limit`)
DEFAULT_LISTED = 200
YIELD_EVERY = 32  # tasks walked between letting go of the GIL (~0.25 ms of walking)

# id(task) -> (weak reference to it, created_by, since when, which clock): a task's origin is
# read once. Keyed by id, a plain dict: a WeakKeyDictionary makes a weak reference per lookup.
_Origin = tuple["weakref.ReferenceType[asyncio.Task[Any]]", str, float, str]
_origins: dict[int, _Origin] = {}
_walking = threading.Lock()  # one walk at a time: concurrent /tasks requests queue for it


# id(code) -> (code, kind): 0 library code, 1 project code, 2 project code with a `request`
# local. Keyed by id: hashing a code object hashes its contents, every time. The code object is
# kept in the entry, so its id is never reused while the entry exists.
_code_kind: dict[int, tuple[types.CodeType, int]] = {}
_DRIVER = inspect.CO_ITERABLE_COROUTINE  # a generator made a coroutine (types.coroutine)


def _kind(code: types.CodeType) -> int:
    entry = _code_kind.get(id(code))
    if entry is None:
        project = frames.is_project(code.co_filename)
        kind = (2 if "request" in code.co_varnames else 1) if project else 0
        _code_kind[id(code)] = entry = (code, kind)
    return entry[1]


@dataclass(slots=True)
class TaskView:
    """One task as read off the loop: where it waits, since when, made by whom."""

    task: asyncio.Task[Any]
    key: tuple[int, int] | None  # the waiting frame's code (by id, in _code_kind) and line
    chain: list[tuple[object, types.FrameType]]
    age_s: float
    created_by: str


def await_chain(coro: object) -> list[tuple[object, types.FrameType]]:
    """A coroutine's await chain, outermost first: each suspended coroutine and its frame."""
    chain: list[tuple[object, types.FrameType]] = []
    obj: object = coro
    coroutine, generator = types.CoroutineType, types.GeneratorType
    for _ in range(MAX_DEPTH):
        kind = type(obj)
        if kind is coroutine:
            frame = obj.cr_frame  # type: ignore[attr-defined]
            nxt = obj.cr_await  # type: ignore[attr-defined]
        elif kind is generator:
            frame = obj.gi_frame  # type: ignore[attr-defined]
            nxt = obj.gi_yieldfrom  # type: ignore[attr-defined]
            if nxt is None and frame is not None and frame.f_code.co_flags & _DRIVER:
                nxt = _driven(obj)
        else:
            break
        if frame is None:
            break
        chain.append((obj, frame))
        if nxt is None:
            break
        obj = nxt
    return chain


def _driven(generator: object) -> object | None:
    """The suspended coroutine a generator drives by hand (a metered request's handler), if any.

    Read from what the generator refers to (its locals among them): `frame.f_locals` would
    attach a dict of them to every frame it is read from, for as long as the frame lives.
    """
    for value in gc.get_referents(generator):
        if (
            type(value) is types.CoroutineType
            and value.cr_frame is not None
            and not value.cr_running
        ):
            return value
    return None


def view(task: asyncio.Task[Any], now_perf: float, now_mono: float) -> TaskView:
    """Where `task` waits, how old it is, and who made it."""
    chain = await_chain(task.get_coro())
    inner: types.FrameType | None = None
    known = _origins.get(id(task))
    if known is not None and known[0]() is not task:
        known = None  # that id belonged to a task that is gone
    kinds = _code_kind
    for obj, frame in chain:
        code = frame.f_code
        entry = kinds.get(id(code))
        kind = entry[1] if entry is not None else _kind(code)
        if kind:
            inner = frame
            if kind == 2 and known is None:
                known = _origin_of(task, obj, now_mono)
    if known is None:
        known = _origin_of(task, None, now_mono)
    if inner is None and chain:
        inner = chain[-1][1]
    key = (id(inner.f_code), inner.f_lineno) if inner is not None else None
    _, created_by, started, clock = known
    age = (now_perf if clock == "perf" else now_mono) - started
    return TaskView(task, key, chain, max(0.0, age), created_by)


def _origin_of(task: asyncio.Task[Any], handler: object | None, now_mono: float) -> _Origin:
    """Who made a task and since when, read once and kept for as long as the task lives.

    A request's handler (`handler`, a suspended coroutine with a `request` local) gives the
    route and the request's start; any other task its name and the time it was first seen.
    """
    origin: _Origin | None = None
    if handler is not None:
        request = next((r for r in gc.get_referents(handler) if type(r) is web.Request), None)
        if request is not None:
            route = frames.canonical_route(request) or UNMATCHED
            steps = request.get(STEPS)
            started = getattr(steps, "started", 0.0)  # unset until its driver's first step
            if started:
                origin = (weakref.ref(task), route, started, "perf")
    if origin is None:
        if handler is not None:
            return (weakref.ref(task), task.get_name(), now_mono, "mono")  # not kept: look again
        name = task.get_name()
        if name.startswith("Task-"):
            name = getattr(task.get_coro(), "__qualname__", name)
        origin = (weakref.ref(task), name, now_mono, "mono")
    _origins[id(task)] = origin
    return origin


def _where(key: tuple[int, int] | None) -> tuple[str, str]:
    if key is None:
        return "(not suspended)", ""
    code = _code_kind[key[0]][0]
    line = key[1]
    return f"{frames.short_path(code.co_filename)}:{line}", frames.source_line(
        code.co_filename, line
    )


def report(loop: asyncio.AbstractEventLoop, listed: int, exclude: object) -> dict[str, Any]:
    """The `/tasks` answer for the tasks of `loop`; runs off the loop, in the default executor.

    asyncio.all_tasks(loop) copies the loop's task set retrying if the loop adds one meanwhile
    (documented as safe from another thread). Every `YIELD_EVERY` tasks the walk lets go of the
    GIL (`time.sleep(0)`), so a loop that has work waits for it a fraction of a switch interval.
    Tasks that end before the walk reaches them are counted in `ended`: how blurred the picture is.
    """
    with _walking:
        return _report(loop, listed, exclude)


def _report(loop: asyncio.AbstractEventLoop, listed: int, exclude: object) -> dict[str, Any]:
    started = perf_counter()
    now_mono = time.monotonic()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not exclude]
    for gone in [k for k, origin in _origins.items() if origin[0]() is None]:
        _origins.pop(gone, None)  # tasks that have ended
    views: list[TaskView] = []
    ended = 0
    for i, task in enumerate(tasks):
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)
        if task.done():
            ended += 1
        else:
            views.append(view(task, started, now_mono))
    groups: dict[tuple[int, int] | None, list[TaskView]] = {}
    for v in views:
        members = groups.get(v.key)
        if members is None:
            groups[v.key] = [v]
        else:
            members.append(v)
    ordered = sorted(groups.items(), key=lambda item: len(item[1]), reverse=True)
    rows = []
    for key, members in ordered:
        where, line = _where(key)
        rows.append(
            {
                "where": where,
                "line": line,
                "count": len(members),
                "oldest_s": round(max(m.age_s for m in members), 3),
                "created_by": Counter(m.created_by for m in members).most_common(1)[0][0],
                "project": key is not None and _code_kind[key[0]][1] > 0,
            }
        )
    body: dict[str, Any] = {"total": len(views), "ended": ended, "groups": rows}
    # the line of the project's own code most tasks wait at (the connections' own tasks, waiting
    # for their request's task inside aiohttp, come as a group of about the same size)
    top = next((row for row in rows if row["project"]), rows[0] if rows else None)
    if top is not None:
        body["summary"] = f"{top['count']} tasks at {top['where']} `{top['line']}`"
    if listed:
        oldest = sorted(views, key=lambda v: v.age_s, reverse=True)[:listed]
        body["tasks"] = [
            {
                "name": v.task.get_name(),
                "coro": getattr(v.task.get_coro(), "__qualname__", ""),
                "where": _where(v.key)[0],
                "await_chain": [frames.location(f) for _, f in v.chain],
                "age_s": round(v.age_s, 3),
                "created_by": v.created_by,
            }
            for v in oldest
        ]
    body["build_ms"] = round((perf_counter() - started) * 1000.0, 3)
    return body


@routes.get("/tasks")
async def tasks_handler(request: web.Request) -> web.Response:
    detail = int_param(request, "detail", default=0, lo=0, hi=1)
    limit = int_param(request, "limit", default=DEFAULT_LISTED, lo=1, hi=MAX_LISTED)
    loop = asyncio.get_running_loop()
    started = perf_counter()
    walk = loop.run_in_executor(None, report, loop, limit if detail else 0, asyncio.current_task())
    on_loop = perf_counter() - started
    body = await walk
    resumed = perf_counter()
    text = json.dumps(body)
    # the handler's own time on the loop: submitting the walk, then encoding its answer
    body["loop_ms"] = round((on_loop + perf_counter() - resumed) * 1000.0, 3)
    return web.json_response(text=text[:-1] + f', "loop_ms": {body["loop_ms"]}}}')
