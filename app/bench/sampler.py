"""Polls the server's /stats and /metrics while locust runs, so the report can show the server side.

/stats gives open connections, RSS and the loop lag over the server's rolling window; /metrics gives
the `looplab_loop_lag_seconds` histogram, whose change between two scrapes is the exact lag count
and sum of that interval (and, bucketed, its distribution).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from app.launch import eventually

LAG_METRIC = "looplab_loop_lag_seconds"


@dataclass(frozen=True)
class LagHistogram:
    """Cumulative bucket counts (upper bound in seconds -> count), plus count and sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def minus(self, earlier: LagHistogram) -> LagHistogram:
        before = dict(earlier.buckets)
        return LagHistogram(
            tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            self.count - earlier.count,
            self.total - earlier.total,
        )

    def mean_ms(self) -> float:
        return 1000.0 * self.total / self.count if self.count else 0.0

    def quantile_ms(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear within the bucket holding the q-th sample."""
        lo, hi = self.bucket_of(q)
        if not self.count:
            return 0.0
        if math.isinf(hi):
            return 1000.0 * lo
        prev_count = 0.0
        for le, n in self.buckets:
            if le == hi:
                inside = n - prev_count
                fraction = (q * self.count - prev_count) / inside if inside else 1.0
                return 1000.0 * (lo + (hi - lo) * fraction)
            prev_count = n
        return 1000.0 * hi

    def bucket_of(self, q: float) -> tuple[float, float]:
        """Bounds (seconds) of the bucket that holds the q-th sample: the exact answer's range."""
        rank = q * self.count
        lo = 0.0
        for le, n in self.buckets:
            if n >= rank:
                return lo, le
            lo = le
        return lo, math.inf


def parse_lag_histogram(text: str) -> LagHistogram | None:
    for family in text_string_to_metric_families(text):
        if family.name != LAG_METRIC:
            continue
        buckets: list[tuple[float, float]] = []
        count = total = 0.0
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name.endswith("_count"):
                count = float(sample.value)
            elif sample.name.endswith("_sum"):
                total = float(sample.value)
        return LagHistogram(tuple(sorted(buckets)), count, total)
    return None


@dataclass(frozen=True)
class ServerSample:
    t: float  # epoch seconds when the /stats answer arrived
    stats: dict[str, Any]
    lag: LagHistogram | None

    @property
    def open_connections(self) -> int:
        return int(self.stats["connections"]["open"])

    @property
    def rss_mb(self) -> float:
        return float(self.stats["rss_mb"])


@dataclass
class StatsSampler:
    """Reads /stats and /metrics every `interval` seconds until stopped."""

    url: str
    interval: float = 1.0
    expect_pid: int | None = None  # a worker behind a shared port: answers from another are dropped
    on_sample: Callable[[ServerSample], None] | None = None
    samples: list[ServerSample] = field(default_factory=list)
    errors: int = 0
    _session: aiohttp.ClientSession | None = None
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StatsSampler:
        # one keep-alive connection, opened before the baseline so it does not count as load
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=1),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        if self._session is not None:
            await self._session.close()

    async def sample(self) -> ServerSample:
        assert self._session is not None
        async with self._session.get(f"{self.url}/stats") as response:
            response.raise_for_status()
            stats: dict[str, Any] = await response.json()
        if self.expect_pid is not None and stats.get("pid") != self.expect_pid:
            # the keep-alive connection was replaced and the kernel chose another worker
            raise ValueError(f"worker {stats.get('pid')} answered for {self.expect_pid}")
        t = time.time()
        async with self._session.get(f"{self.url}/metrics") as response:
            response.raise_for_status()
            lag = parse_lag_histogram(await response.text())
        sample = ServerSample(t, stats, lag)
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            try:
                await self.sample()
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                self.errors += 1  # a starved server answers late; the next tick tries again
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def lag_over(samples: Sequence[ServerSample]) -> LagHistogram | None:
    """The lag histogram of the span between the first and the last sample."""
    with_lag = [s.lag for s in samples if s.lag is not None]
    if len(with_lag) < 2:
        return None
    return with_lag[-1].minus(with_lag[0])


class WorkerSamplers:
    """One StatsSampler per server worker behind one SO_REUSEPORT port.

    The kernel hands each new connection to a worker by a hash of its addresses and ports, so
    the samplers open connections until every one of `workers` pids has answered, and keep each
    worker's keep-alive connection: /stats and /metrics on it then always come from that worker.
    """

    def __init__(self, url: str, workers: int, interval: float = 1.0) -> None:
        self.url = url
        self.workers = workers
        self.interval = interval
        self.by_pid: dict[int, StatsSampler] = {}
        self.tries = 0

    async def __aenter__(self) -> WorkerSamplers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sampler in self.by_pid.values():
            await sampler.__aexit__(*exc)

    async def discover(self, within: float = 60.0) -> dict[int, StatsSampler]:
        """Connect until each worker has answered (every worker is then serving)."""

        async def one_more_answered() -> bool:
            self.tries += 1
            sampler = await StatsSampler(self.url, self.interval).__aenter__()
            try:
                pid = int((await sampler.sample()).stats["pid"])
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                pid = None  # a worker still starting: try again shortly
            if pid is None or pid in self.by_pid:
                await sampler.__aexit__(None)
            else:
                sampler.expect_pid = pid
                sampler.samples.clear()
                self.by_pid[pid] = sampler
            return len(self.by_pid) >= self.workers

        try:
            await eventually(one_more_answered, within=within, interval=0.01)
        except TimeoutError:
            raise TimeoutError(
                f"{len(self.by_pid)} of {self.workers} workers answered /stats within "
                f"{within:g} s ({self.tries} connections)"
            ) from None
        return self.by_pid

    @property
    def samplers(self) -> list[StatsSampler]:
        return [self.by_pid[pid] for pid in sorted(self.by_pid)]

    async def sample(self) -> list[ServerSample]:
        return list(await asyncio.gather(*(s.sample() for s in self.samplers)))

    def start(self) -> None:
        for sampler in self.samplers:
            sampler.start()

    async def stop(self) -> None:
        for sampler in self.samplers:
            await sampler.stop()

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samplers)
