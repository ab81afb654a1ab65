"""Client-side request samples: the exact per-request log every locust process writes.

Percentiles here are computed from every request's exact response time (nearest rank), not from
locust's report, which rounds times above 10 s to whole seconds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.percentiles import percentile


@dataclass(frozen=True)
class Request:
    end: float  # epoch seconds
    name: str
    ms: float
    failed: bool

    @property
    def start(self) -> float:
        return self.end - self.ms / 1000.0


@dataclass(frozen=True)
class LatencySummary:
    requests: int
    failures: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, requests: Sequence[Request]) -> LatencySummary:
        times = sorted(r.ms for r in requests)
        return cls(
            requests=len(times),
            failures=sum(r.failed for r in requests),
            p50=round(percentile(times, 0.50), 3),
            p95=round(percentile(times, 0.95), 3),
            p99=round(percentile(times, 0.99), 3),
            max=round(times[-1], 3) if times else 0.0,
        )


@dataclass
class RequestLog:
    requests: list[Request] = field(default_factory=list)

    @classmethod
    def read(cls, directory: Path) -> RequestLog:
        log = cls()
        for path in sorted(directory.glob("samples-*.tsv")):
            for line in path.read_text(encoding="utf-8").splitlines():
                parts = line.split("\t")
                if len(parts) != 4:
                    continue  # a line cut short by a killed worker
                end, name, ms, failed = parts
                log.requests.append(Request(float(end), name, float(ms), failed == "1"))
        log.requests.sort(key=lambda r: r.end)
        return log

    def __len__(self) -> int:
        return len(self.requests)

    def names(self) -> list[str]:
        return sorted({r.name for r in self.requests})

    def by_name(self) -> dict[str, list[Request]]:
        groups: dict[str, list[Request]] = defaultdict(list)
        for r in self.requests:
            groups[r.name].append(r)
        return dict(sorted(groups.items()))

    def span(self) -> tuple[float, float]:
        """First request start to last request end (epoch seconds)."""
        if not self.requests:
            return (0.0, 0.0)
        return (min(r.start for r in self.requests), max(r.end for r in self.requests))

    def between(self, start: float, end: float) -> list[Request]:
        return [r for r in self.requests if start <= r.end < end]


@dataclass(frozen=True)
class SecondBin:
    t: float  # bin start, epoch seconds
    count: int
    failures: int
    p50: float
    p99: float
    max: float


def per_second(requests: Iterable[Request], width: float = 1.0) -> list[SecondBin]:
    """Requests grouped by the second they completed in: throughput and latency over time."""
    bins: dict[int, list[Request]] = defaultdict(list)
    for r in requests:
        bins[int(r.end // width)].append(r)
    out = []
    for key in sorted(bins):
        group = bins[key]
        times = sorted(r.ms for r in group)
        out.append(
            SecondBin(
                t=key * width,
                count=len(group),
                failures=sum(r.failed for r in group),
                p50=percentile(times, 0.5),
                p99=percentile(times, 0.99),
                max=times[-1],
            )
        )
    return out


def read_phases(directory: Path) -> list[tuple[float, str]]:
    """(start epoch, name) of each phase a LoadTestShape walked through, if it logged any."""
    path = directory / "phases.tsv"
    if not path.is_file():
        return []
    phases = []
    for line in path.read_text(encoding="utf-8").splitlines():
        start, _, name = line.partition("\t")
        if name:
            phases.append((float(start), name))
    return phases
