"""The live progress display of a bench run (rich, on stderr): time left and the server's vitals."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from app.bench.sampler import ServerSample


class BenchProgress:
    def __init__(self, title: str, duration_s: float, *, enabled: bool = True) -> None:
        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self._console,
            disable=not enabled,
            refresh_per_second=2,
        )
        self._duration = duration_s
        self._task: TaskID = self._progress.add_task(title, total=duration_s, status="starting")
        self._started: float | None = None
        self._last: tuple[float, int] | None = None  # (time, server requests_total)

    def __enter__(self) -> BenchProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def status(self, text: str) -> None:
        self._progress.update(self._task, status=text)

    def load_started(self) -> None:
        self._started = time.monotonic()

    def on_sample(self, sample: ServerSample) -> None:
        stats = sample.stats
        total = int(stats.get("requests_total", 0))
        rps = 0.0
        if self._last is not None and sample.t > self._last[0]:
            rps = (total - self._last[1]) / (sample.t - self._last[0])
        self._last = (sample.t, total)
        elapsed = 0.0 if self._started is None else time.monotonic() - self._started
        self._progress.update(
            self._task,
            completed=min(elapsed, self._duration),
            status=(
                f"open {stats['connections']['open']:>6,}  "
                f"rps {rps:>7,.0f}  "
                f"lag p99 {stats['lag_ms']['p99']:>8.1f} ms  "
                f"rss {stats['rss_mb']:>6.0f} MB"
            ),
        )

    def print(self, text: str) -> None:
        self._console.print(text)
