"""Event loop selection: the default asyncio loop or uvloop, without the deprecated policy API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

LoopName = Literal["asyncio", "uvloop"]
LOOP_NAMES: tuple[LoopName, ...] = ("asyncio", "uvloop")


def loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a zero-argument factory for `asyncio.Runner(loop_factory=...)`."""
    if name == "uvloop":
        import uvloop  # imported lazily: the asyncio path must not need it

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown loop {name!r}; choose one of {', '.join(LOOP_NAMES)}")


def new_event_loop(name: LoopName) -> asyncio.AbstractEventLoop:
    """Create (but do not install) a fresh loop of the named implementation."""
    return loop_factory(name)()


def loop_name(loop: asyncio.AbstractEventLoop) -> LoopName:
    """Name the loop by its real class, never by the flag that asked for it."""
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"
