"""matrix.md and its plots: verdicts, throughput and the 10k load per interpreter and loop."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot

import matplotlib.pyplot as plt

from app.bench.matrix import BUSY_SHARE
from app.bench.plots import DPI, LOOP_COLOURS
from app.bench.report import machine_line

Row = tuple[str, Sequence[str]]  # a table row: its label, one value per column

SPREAD_LIMIT = 1.05  # paired ratios further apart than this are reported as noisy


def _column(cell: dict[str, Any]) -> str:
    return f"{cell['python_full']} {cell['loop']}"


def _verdicts(cell: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in cell["claims"]}


def changed_claims(cells: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per column, the claims whose verdict differs from the first interpreter on the same loop."""
    first = cells[0]["python"] if cells else ""
    base = {c["loop"]: _verdicts(c) for c in cells if c["python"] == first}
    return {
        _column(c): {i for i, v in _verdicts(c).items() if base.get(c["loop"], {}).get(i, v) != v}
        for c in cells
    }


def matrix_notes(data: dict[str, Any]) -> list[str]:
    notes = []
    for cell in data["cells"]:
        for path, s in cell["saturated"].items():
            if not s["server_bound"]:
                why = (
                    "wrk, not the server, set the pace"
                    if s["generator_cpu_share"] >= BUSY_SHARE
                    else "neither was CPU-bound: other load on the machine took the server's CPU"
                )
                notes.append(
                    f"{_column(cell)} {path}: the server used {s['server_cpu_share']:.0%} of its "
                    f"CPU and wrk {s['generator_cpu_share']:.0%} of its own; {why}, so this rps "
                    "is a floor, not the loop's limit"
                )
        if cell["multiplex"]["load_generator_cpu_warning"]:
            notes.append(f"{_column(cell)}: locust hit its CPU warning in the multiplex run")
    for python, paths in data["ratio"].items():
        for path, r in paths.items():
            if data["rounds"] > 1 and r["spread"] > SPREAD_LIMIT:
                notes.append(
                    f"Python {python} {path}: paired uvloop/asyncio ratios spread "
                    f"{r['min']:.3f}-{r['max']:.3f} (more than {SPREAD_LIMIT - 1:.0%})"
                )
    return notes


def broken_cells(data: dict[str, Any]) -> list[str]:
    """Cells where a claim's experiment failed to run or a request of the load failed."""
    broken = []
    for cell in data["cells"]:
        errors = [c["id"] for c in cell["claims"] if c["verdict"] == "error"]
        faults = [f"claim {claim_id} failed to run" for claim_id in errors]
        if failures := cell["multiplex"]["failures"]:
            faults.append(f"{failures} requests failed under load")
        if faults:
            broken.append(f"{_column(cell)}: {', '.join(faults)}")
    return broken


def matrix_report(data: dict[str, Any]) -> str:
    cells = data["cells"]
    columns = [_column(c) for c in cells]
    changed = changed_claims(cells)
    lines = [
        "# loop-lab matrix: interpreters x event loops",
        "",
        f"On {machine_line(data['machine'])}; source {data.get('source') or '?'}. Each "
        f"interpreter in its own container, the server pinned to one CPU and wrk on the other; "
        f"{data['rounds']} round(s) of {data['wrk']['duration_s']:g} s per path, a fresh server "
        f"per round, loops alternating; then {data['multiplex']['users']:,} connections for "
        f"{data['multiplex']['duration_s']} s (delay {data['multiplex']['delay_s']:g} s) from "
        "locust outside the cells' containers.",
        "",
        "```",
        *(shlex.join(run["command"]) for run in data.get("runs", [])),
        shlex.join(data["command"]) if data["command"] else "loop-lab matrix",
        "```",
        "",
        "Inside each image: "
        + "; ".join(
            f"Python {c['versions']['python']} with aiohttp {c['versions']['aiohttp']}, "
            f"uvloop {c['versions']['uvloop']}"
            for c in cells
            if c["loop"] == "asyncio"
        )
        + ".",
        "",
        "## Claims",
        "",
        "A verdict in **bold** differs from the first interpreter on the same loop.",
        "",
    ]

    def verdict(cell: dict[str, Any], claim_id: str) -> str:
        said = _verdicts(cell).get(claim_id, "-")
        return f"**{said}**" if claim_id in changed[_column(cell)] else said

    ids = [c["id"] for c in cells[0]["claims"]] if cells else []
    lines += _table(
        "claim", columns, "---", [(i, [verdict(cell, i) for cell in cells]) for i in ids]
    )
    differing = sorted({i for ids_ in changed.values() for i in ids_})
    if differing:
        lines += ["", "What the interpreters answered where they differ:", ""]
        for claim_id in differing:
            lines.append(f"- **{claim_id}**")
            for cell in cells:
                evidence = next(c["evidence"] for c in cell["claims"] if c["id"] == claim_id)
                lines.append(f"  - {_column(cell)}: {evidence}")
    paths = list(cells[0]["saturated"]) if cells else []
    lines += [
        "",
        "## Saturated throughput",
        "",
        "Median requests/s over rounds (server CPU µs per request).",
        "",
    ]

    def saturated(cell: dict[str, Any], path: str) -> str:
        s = cell["saturated"][path]
        mark = "" if s["server_bound"] else " ⚠"
        return f"{s['rps']:,.0f} ({s['cpu_us_per_request']:.1f} µs){mark}"

    lines += _table(
        "path", columns, "---:", [(f"`{p}`", [saturated(cell, p) for cell in cells]) for p in paths]
    )
    lines += [
        "",
        "uvloop / asyncio requests/s, paired by round: median (min-max).",
        "",
        "| Python | " + " | ".join(f"`{p}`" for p in paths) + " |",
        "|---|" + "---:|" * len(paths),
    ]
    for python, by_path in data["ratio"].items():
        lines.append(
            f"| {python} | "
            + " | ".join(
                f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})" for r in by_path.values()
            )
            + " |"
        )
    lines += _instruction_lines(data)
    lines += [
        "",
        f"## {data['multiplex']['users']:,} connections",
        "",
        "| cell | failures | p99 ms | loop lag p99 ms | lag max ms | peak open "
        "| RSS KB/connection | server CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        m = cell["multiplex"]
        lines.append(
            f"| {_column(cell)} | {m['failures']} | {m['p99_ms']:,.0f} | {m['lag_p99_ms']} "
            f"| {m['lag_max_ms']} | {m['peak_open_connections']} "
            f"| {m['rss_kb_per_connection']} | {m['cpu_us_per_request']} |"
        )
    notes = matrix_notes(data)
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in notes] or ["- every cell was server-bound; no ratio was noisy"]
    lines += ["", "Plots: `matrix-saturated.png`, `matrix-ratio.png`", ""]
    return "\n".join(lines)


def _table(corner: str, columns: Sequence[str], align: str, rows: Iterable[Row]) -> list[str]:
    """A markdown table: `corner` over the row labels, one column a cell (interpreter x loop)."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---|" + f"{align}|" * len(columns)]
    return lines + [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]


def _instruction_lines(data: dict[str, Any]) -> list[str]:
    cells = [c for c in data["cells"] if c.get("instructions")]
    if not cells:
        return []
    paths = list(cells[0]["instructions"])
    counts = [(f"`{p}`", [f"{c['instructions'][p]:,}" for c in cells]) for p in paths]
    idle = ("idle server, per second", [f"{c.get('idle_instructions_per_s', 0):,}" for c in cells])
    ratios = data.get("instruction_ratio", {}).items()
    return [
        "",
        "## Instructions per request (callgrind)",
        "",
        "The server under valgrind's callgrind, one run per cell, per request without what "
        "ran on a clock meanwhile (the idle rate x each batch's wall time, which valgrind "
        "stretches ~50x; the idle rate is its own row). The count does not move with other load "
        "on the machine, so it is the verdict on what a request costs each interpreter and "
        "loop; the requests/s above stand beside it.",
        "",
        *_table("path", [_column(c) for c in cells], "---:", [*counts, idle]),
        "",
        "uvloop / asyncio instructions per request (below 1: uvloop does less work).",
        "",
        *_table(
            "Python",
            [f"`{p}`" for p in paths],
            "---:",
            ((python, [f"{by_path[p]:.3f}" for p in paths]) for python, by_path in ratios),
        ),
    ]


def matrix_plots(data: dict[str, Any], out: Path) -> list[Path]:
    cells = data["cells"]
    if not cells:
        return []
    pythons = list(dict.fromkeys(c["python"] for c in cells))
    paths = list(cells[0]["saturated"])
    width = 0.38
    fig, axes = plt.subplots(1, len(paths), figsize=(4 * len(paths), 3.6), squeeze=False)
    by_cell = {(c["python"], c["loop"]): c for c in cells}
    for ax, path in zip(axes[0], paths, strict=True):
        for offset, loop in ((-width / 2, "asyncio"), (width / 2, "uvloop")):
            values = [
                by_cell[(p, loop)]["saturated"][path]["rps"] if (p, loop) in by_cell else 0.0
                for p in pythons
            ]
            xs = [i + offset for i in range(len(pythons))]
            ax.bar(xs, values, width, label=loop, color=LOOP_COLOURS[loop])
        ax.set_xticks(range(len(pythons)), pythons)
        ax.set_title(path)
        ax.set_ylabel("requests/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("saturated throughput per interpreter (server on one CPU)", fontsize=10)
    fig.tight_layout()
    saturated = out / "matrix-saturated.png"
    fig.savefig(saturated, dpi=DPI)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, path in enumerate(paths):
        ratios = [data["ratio"][p][path] for p in pythons]
        xs = [n + (i - 1) * 0.2 for n in range(len(pythons))]
        mids = [r["median"] for r in ratios]
        below = [m - r["min"] for m, r in zip(mids, ratios, strict=True)]
        above = [r["max"] - m for m, r in zip(mids, ratios, strict=True)]
        errors = [below, above]
        ax.errorbar(xs, mids, yerr=errors, fmt="o", capsize=3, label=path)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(pythons)), pythons)
    ax.set_ylabel("uvloop / asyncio requests/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ratio = out / "matrix-ratio.png"
    fig.savefig(ratio, dpi=DPI)
    plt.close(fig)
    return [saturated, ratio]
