"""A real loop-lab server on a real socket (port 0), on a chosen loop, in its own thread.

Running the server on its own thread and loop keeps the test's client loop independent: when a
handler blocks the server's loop, the client can still time what it sees.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from app.config import Settings
from app.loops import LoopName, loop_factory
from app.server import RunningServer, start_server


class ServerThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: RunningServer | None = None
        self._thread = threading.Thread(target=self._run, name="looplab-test-server", daemon=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=loop_factory(self.settings.loop)) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = await start_server(self.settings)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise TimeoutError("server thread did not become ready in 30 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "server thread did not stop"


@contextmanager
def running_server(loop: LoopName = "asyncio", **overrides: object) -> Iterator[ServerThread]:
    """Serve on 127.0.0.1:0 with the given loop and setting overrides until the block exits."""
    settings = replace(Settings(loop=loop, port=0, grace=5.0, stall_threshold=0.2), **overrides)  # type: ignore[arg-type]
    thread = ServerThread(settings)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
