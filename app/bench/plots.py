"""Plots over time for one bench run, and the comparison/sweep charts (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot

import matplotlib.pyplot as plt

from app.bench.latency import RequestLog, per_second
from app.bench.sampler import ServerSample

DPI = 90  # small, commit-sized PNGs
Panel = Callable[[Any], None]
Metric = Callable[[dict[str, Any]], float]
LOOP_COLOURS = {"asyncio": "tab:blue", "uvloop": "tab:orange"}


class RunPlots:
    """The four time series of one run, each as a PNG, plus an overview with all four."""

    def __init__(
        self,
        log: RequestLog,
        samples: Sequence[ServerSample],
        phases: Sequence[tuple[float, str]],
        title: str,
    ) -> None:
        self.log = log
        self.samples = list(samples)
        self.phases = list(phases)
        self.title = title
        starts = [log.span()[0]] if len(log) else []
        self.t0 = min([*starts, *(s.t for s in self.samples)], default=0.0)
        self.t_end = max([log.span()[1], *(s.t for s in self.samples)], default=0.0)
        # one colour per request name in every panel
        self.colour = {name: f"C{i % 10}" for i, name in enumerate(log.names())}

    def _x(self, t: float) -> float:
        return t - self.t0

    def _mark_phases(self, ax: Any) -> None:
        for i, (start, name) in enumerate(self.phases):
            end = self.phases[i + 1][0] if i + 1 < len(self.phases) else self.t_end
            if i % 2:
                ax.axvspan(self._x(start), self._x(end), color="0.92", zorder=0)
            ax.text(
                self._x(start),
                1.0,
                f" {name}",
                transform=ax.get_xaxis_transform(),
                va="top",
                fontsize=7,
                color="0.35",
            )

    def latency(self, ax: Any) -> None:
        for name, requests in self.log.by_name().items():
            bins = per_second(requests)
            xs = [self._x(b.t + 0.5) for b in bins]
            colour = self.colour[name]
            ax.plot(xs, [max(b.p99, 0.01) for b in bins], label=f"{name} p99", lw=1.2, c=colour)
            ax.plot(xs, [max(b.p50, 0.01) for b in bins], ls=":", lw=1, c=colour)
        ax.set_yscale("log")
        ax.set_ylabel("latency ms (log)")
        ax.set_title("client latency per request name, per second (solid p99, dotted p50)")
        ax.legend(fontsize=7, loc="best")
        self._mark_phases(ax)

    def lag(self, ax: Any) -> None:
        xs = [self._x(s.t) for s in self.samples]
        window = self.samples[0].stats.get("lag_window_s", "?") if self.samples else "?"
        ax.plot(xs, [s.stats["lag_ms"]["max"] for s in self.samples], label=f"max ({window} s)")
        ax.plot(xs, [s.stats["lag_ms"]["p99"] for s in self.samples], label=f"p99 ({window} s)")
        mean_x, mean_y = [], []
        for before, after in zip(self.samples, self.samples[1:], strict=False):
            if before.lag is not None and after.lag is not None:
                delta = after.lag.minus(before.lag)
                if delta.count:
                    mean_x.append(self._x(after.t))
                    mean_y.append(delta.mean_ms())
        ax.plot(mean_x, mean_y, label="mean (each interval)", lw=1)
        ax.set_ylabel("loop lag ms")
        ax.set_title("server loop lag")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="best")
        self._mark_phases(ax)

    def connections(self, ax: Any) -> None:
        xs = [self._x(s.t) for s in self.samples]
        ax.plot(xs, [s.open_connections for s in self.samples], color="tab:green", label="open")
        ax.set_ylabel("open connections")
        ax.set_ylim(bottom=0)
        rss = ax.twinx()
        rss.plot(xs, [s.rss_mb for s in self.samples], color="tab:red", lw=1, label="RSS")
        rss.set_ylabel("server RSS MB", color="tab:red")
        rss.set_ylim(bottom=0)
        ax.set_title("server: open TCP connections (green) and RSS (red)")
        self._mark_phases(ax)

    def rps(self, ax: Any) -> None:
        total = per_second(self.log.requests)
        xs = [self._x(b.t + 0.5) for b in total]
        ax.plot(xs, [b.count for b in total], label="all", lw=1.5, c="black")
        for name, requests in self.log.by_name().items():
            bins = per_second(requests)
            ax.plot(
                [self._x(b.t + 0.5) for b in bins],
                [b.count for b in bins],
                label=name,
                lw=1,
                c=self.colour[name],
            )
        failures = [b for b in total if b.failures]
        if failures:
            ax.plot(
                [self._x(b.t + 0.5) for b in failures],
                [b.failures for b in failures],
                "x",
                color="red",
                label="failures",
            )
        ax.set_ylabel("requests/s")
        ax.set_title("completed requests per second")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="best")
        self._mark_phases(ax)

    def write(self, out_dir: Path) -> list[Path]:
        panels: dict[str, Panel] = {
            "latency": self.latency,
            "lag": self.lag,
            "connections": self.connections,
            "rps": self.rps,
        }
        written = []
        for name, draw in panels.items():
            fig, ax = plt.subplots(figsize=(8, 3.6))
            draw(ax)
            ax.set_xlabel("seconds since start")
            fig.suptitle(self.title, fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            written.append(path)
        fig, axes = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
        for ax, draw in zip(axes, panels.values(), strict=True):
            draw(ax)
        axes[-1].set_xlabel("seconds since start")
        fig.suptitle(self.title, fontsize=10)
        fig.tight_layout()
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
        return written


def compare_plot(rounds: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """rps, p99 and loop-lag p99 of each run, asyncio next to uvloop, round by round."""
    metrics: tuple[tuple[str, str, Metric], ...] = (
        ("rps", "requests/s", lambda r: r["rps"]),
        ("p99", "p99 latency ms", lambda r: r["latency_ms"]["p99"]),
        ("lag p99", "loop lag p99 ms", lambda r: r["server"]["lag_ms"]["p99"] or 0.0),
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(11, 3.6))
    round_numbers = sorted({int(r["round"]) for r in rounds})
    width = 0.38
    for ax, (label, unit, get) in zip(axes, metrics, strict=True):
        for offset, loop in ((-width / 2, "asyncio"), (width / 2, "uvloop")):
            values = []
            for n in round_numbers:
                match = [r for r in rounds if r["round"] == n and r["loop"] == loop]
                values.append(get(match[0]["result"]) if match else 0.0)
            ax.bar(
                [n + offset for n in round_numbers],
                values,
                width,
                label=loop,
                color=LOOP_COLOURS[loop],
            )
        ax.set_xticks(round_numbers)
        ax.set_xlabel("round")
        ax.set_ylabel(unit)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def sweep_plot(
    points: Sequence[dict[str, Any]], title: str, path: Path, delay_s: float = 0.0
) -> Path:
    """The scaling curve against concurrency: p99, loop lag p99 and max (the worst worker's),
    RSS per connection, accepted connections per user, and the load generator's CPU.

    With a delay, p99 is drawn as what it adds to the delay every request asked for.
    """
    p99_label = f"p99 above the {delay_s:g} s delay, ms" if delay_s else "p99 latency ms"
    metrics: tuple[tuple[str, Metric], ...] = (
        (p99_label, lambda r: r["latency_ms"]["p99"] - 1000.0 * delay_s),
        ("loop lag p99 ms (worst worker)", lambda r: r["server"]["lag_ms"]["p99"] or 0.0),
        ("loop lag max ms (worst worker)", lambda r: r["server"]["lag_ms"]["max"] or 0.0),
        ("RSS growth KB per connection", lambda r: r["server"]["rss_kb_per_connection"] or 0.0),
        (
            "accepted connections per user",
            lambda r: r["server"]["accepted_connections"] / r["users"],
        ),
        (
            "locust CPU, % of a core per process",
            lambda r: r["load_generator"].get("cpu_percent_per_process") or 0.0,
        ),
    )
    fig, axes = plt.subplots(3, 2, figsize=(10, 10))
    for ax, (label, get) in zip(axes.flat, metrics, strict=True):
        for loop in ("asyncio", "uvloop"):
            mine = sorted((p for p in points if p["loop"] == loop), key=lambda p: p["users"])
            if mine:
                ax.plot(
                    [p["users"] for p in mine],
                    [get(p["result"]) for p in mine],
                    "o-",
                    label=loop,
                    color=LOOP_COLOURS[loop],
                )
        ax.set_xscale("log")
        ax.set_xlabel("concurrent users (connections)")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
