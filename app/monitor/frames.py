"""Naming code by where it is: the innermost project frame of a stack, and the request it serves.

The utilisation sampler, the stall watchdog and `/tasks` all answer "where" with the innermost
frame of the project's own code (under app/, the monitor itself excluded), as `app/cpu.py:23`:
that is the line a user can change. The route comes from the handler's own `request` argument
(aiohttp passes it to every handler), read from the frame's locals, so nothing on the request
path has to record it.
"""

from __future__ import annotations

import functools
import linecache
import os
from types import FrameType

from aiohttp import web

import app

APP_DIR = os.path.dirname(os.path.abspath(app.__file__)) + os.sep
ROOT_DIR = os.path.dirname(APP_DIR.rstrip(os.sep)) + os.sep
MONITOR_DIR = os.path.join(APP_DIR, "monitor") + os.sep


@functools.lru_cache(maxsize=4096)
def is_project(filename: str) -> bool:
    """Code of the service itself (app/), not the monitor watching it."""
    return filename.startswith(APP_DIR) and not filename.startswith(MONITOR_DIR)


@functools.lru_cache(maxsize=4096)
def short_path(filename: str) -> str:
    """`app/cpu.py` for the project's files; a library's path from its package on."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at + len(marker) :]
    if filename.startswith(ROOT_DIR):
        return filename[len(ROOT_DIR) :]
    parts = filename.split(os.sep)
    return os.sep.join(parts[-2:])


def location(frame: FrameType) -> str:
    """`file:line` of a frame."""
    return f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno}"


def project_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost frame of project code on the stack that ends at `frame` (None if none)."""
    while frame is not None:
        if is_project(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def where(frame: FrameType | None) -> str | None:
    """`file:line` of the innermost project frame, else of the innermost frame itself."""
    if frame is None:
        return None
    chosen = project_frame(frame) or frame
    return location(chosen)


def source_line(filename: str, lineno: int) -> str:
    """The stripped source text of a line ('' if unknown)."""
    return linecache.getline(filename, lineno).strip()


def route_of(frame: FrameType | None) -> str | None:
    """The route of the request whose handler is on this stack, read from its `request` local."""
    while frame is not None:
        if is_project(frame.f_code.co_filename):
            route = request_route(frame)
            if route is not None:
                return route
        frame = frame.f_back
    return None


def request_route(frame: FrameType) -> str | None:
    """The canonical route of a `request` local of `frame`, if it holds an aiohttp request."""
    request = frame.f_locals.get("request")
    return canonical_route(request) if isinstance(request, web.Request) else None


def canonical_route(request: web.Request) -> str | None:
    """The route aiohttp's router gave `request`; None if no route took it or none was chosen yet.

    Read from other threads (the sampler, the /tasks walk): it must not raise.
    """
    try:
        resource = request.match_info.route.resource
    except (AssertionError, AttributeError):  # not routed yet (the guard screens heads first)
        return None
    return resource.canonical if resource is not None else None
