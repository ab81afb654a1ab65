"""`loop-lab top URL`: a live terminal view of a running server, from `/stats` and `/tasks` only.

Lag, utilisation by cause, requests in flight, the largest task groups, the longest steps by
route and the recent stalls, redrawn every `--interval` seconds. It reads only the two JSON
endpoints, so it works against any loop-lab server it can reach (docker-compose included);
`--once` prints one frame and exits.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

CAUSES = ("cpu", "syscall", "gil", "gc", "unknown")
CAUSE_STYLE = {
    "cpu": "red",
    "syscall": "yellow",
    "gil": "magenta",
    "gc": "cyan",
    "unknown": "white",
}
BAR_WIDTH = 40
TOP_GROUPS = 8
TOP_ROUTES = 6
TOP_STALLS = 5


def fetch(url: str, timeout: float = 5.0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The server's /stats and /tasks (None if /tasks is not served)."""
    base = url.rstrip("/")
    with urllib.request.urlopen(f"{base}/stats", timeout=timeout) as response:
        stats: dict[str, Any] = json.load(response)
    try:
        with urllib.request.urlopen(f"{base}/tasks", timeout=timeout) as response:
            tasks: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError:
        return stats, None
    return stats, tasks


def cause_bar(by_cause: dict[str, float], width: int = BAR_WIDTH) -> Text:
    """One line: a bar of the busy share, each cause in its colour, idle as dots."""
    bar = Text()
    used = 0
    for cause in CAUSES:
        cells = round(by_cause.get(cause, 0.0) * width)
        cells = min(cells, width - used)
        bar.append("█" * cells, style=CAUSE_STYLE[cause])
        used += cells
    bar.append("·" * (width - used), style="dim")
    return bar


def _header(stats: dict[str, Any]) -> Table:
    lag = stats.get("lag_ms", {})
    util = stats.get("utilization")
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        Text(f"loop-lab · {stats.get('loop')} · pid {stats.get('pid')}", style="bold"),
        f"up {stats.get('uptime_s', 0):.0f} s",
        f"in flight {stats.get('in_flight', 0)}",
        f"connections {stats.get('connections', {}).get('open', 0)}",
        f"stalls {stats.get('stalls', 0)}",
    )
    grid.add_row(
        "lag ms",
        f"p50 {lag.get('p50', 0):.1f}",
        f"p99 {lag.get('p99', 0):.1f}",
        f"max {lag.get('max', 0):.1f}",
        "",
    )
    if util is None:
        grid.add_row("busy", "not sampled on this system", "", "", "")
    else:
        grid.add_row(
            "busy 1 s",
            cause_bar(util.get("by_cause_1s", util.get("by_cause", {}))),
            f"{util.get('last_1s', 0) * 100:.0f}%",
            "10 s",
            f"{util.get('last_10s', 0) * 100:.0f}%",
        )
        legend = Text()
        for cause in CAUSES:
            share = util.get("by_cause", {}).get(cause, 0.0)
            legend.append(f"■ {cause} {share * 100:.1f}%  ", style=CAUSE_STYLE[cause])
        grid.add_row("by cause 10 s", legend, "", "", "")
    return grid


def _groups(tasks: dict[str, Any] | None) -> Table:
    table = Table(title="tasks by where they wait", title_justify="left", expand=True)
    table.add_column("count", justify="right")
    table.add_column("where")
    table.add_column("line", overflow="ellipsis", no_wrap=True)
    table.add_column("oldest s", justify="right")
    table.add_column("created by")
    if tasks is None:
        table.add_row("", "(no /tasks on this server)", "", "", "")
        return table
    for group in tasks.get("groups", [])[:TOP_GROUPS]:
        table.add_row(
            str(group["count"]),
            group["where"],
            group.get("line", ""),
            f"{group['oldest_s']:.1f}",
            str(group["created_by"]),
        )
    table.caption = (
        f"{tasks.get('total', 0)} tasks; walked in {tasks.get('build_ms', 0):.0f} ms"
        f" ({tasks.get('ended', 0)} ended meanwhile)"
    )
    return table


def _routes(stats: dict[str, Any]) -> Table:
    table = Table(title="longest steps by route", title_justify="left", expand=True)
    table.add_column("route")
    table.add_column("max step ms", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("in flight", justify="right")
    rows = stats.get("routes", {}).items()
    routes = sorted(rows, key=lambda item: item[1].get("max_step_ms", 0), reverse=True)
    for route, rec in routes[:TOP_ROUTES]:
        table.add_row(
            route, f"{rec.get('max_step_ms', 0):.1f}", str(rec.get("count", 0)),
            str(rec.get("in_flight", 0)),
        )  # fmt: skip
    return table


def _stalls(stats: dict[str, Any]) -> Table:
    table = Table(title="recent stalls", title_justify="left", expand=True)
    table.add_column("at s", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("cause")
    table.add_column("where")
    table.add_column("route")
    for stall in list(reversed(stats.get("stalls_recent", [])))[:TOP_STALLS]:
        cause = stall.get("cause", "unknown")
        label = cause + (f" ({stall['detail']})" if stall.get("detail") else "")
        table.add_row(
            f"{stall.get('started_s', 0):.1f}",
            f"{stall.get('duration_ms', 0):.0f}",
            Text(label, style=CAUSE_STYLE.get(cause, "white")),
            str(stall.get("where") or ""),
            str(stall.get("route") or ""),
        )
    if not stats.get("stalls_recent"):
        table.add_row("", "", "none", "", "")
    return table


def render(stats: dict[str, Any], tasks: dict[str, Any] | None) -> RenderableType:
    """One frame of the view."""
    return Group(_header(stats), _groups(tasks), _routes(stats), _stalls(stats))


def _frame(url: str) -> RenderableType:
    try:
        return render(*fetch(url))
    except (OSError, ValueError) as exc:
        return Text(f"{url}: {exc}", style="bold red")


def run(url: str, *, once: bool = False, interval: float = 1.0) -> int:
    """Show the view until interrupted (or one frame with `once`); the exit status."""
    console = Console()
    if once:
        try:
            frame = render(*fetch(url))
        except (OSError, ValueError) as exc:
            console.print(f"loop-lab top: {url}: {exc}", style="bold red")
            return 1
        console.print(frame)
        return 0
    try:
        with Live(_frame(url), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_frame(url), refresh=True)
    except KeyboardInterrupt:
        return 0
