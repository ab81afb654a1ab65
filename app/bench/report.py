"""report.md for a bench run and compare.md for a comparison: the numbers in words and tables."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

NEAR_SATURATION_PERCENT = 80.0  # a locust process this busy is likely what sets the pace


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def utilization_sentence(server: dict[str, Any]) -> str:
    util = server.get("utilization")
    if not util:
        return "not reported by this server"
    causes = ", ".join(
        f"{cause} {_pct(share)}" for cause, share in util["by_cause"].items() if share > 0.0005
    )
    return f"median {_pct(util['median'])}, max {_pct(util['max'])} ({causes or 'idle'})"


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine.get('cpus')} CPUs ({machine.get('cpu_model') or 'unknown model'}), "
        f"{machine.get('memory_gb')} GB RAM, Linux {machine.get('kernel')}, "
        f"Python {machine.get('python')}"
    )


def lag_sentence(lag: dict[str, Any]) -> str:
    if lag.get("p99") is None:
        return "no loop-lag samples"
    bucket = lag.get("p99_bucket") or [None, None]
    hi = "inf" if bucket[1] is None else _ms(bucket[1])
    return (
        f"p50 {_ms(lag['p50'])} ms, p99 {_ms(lag['p99'])} ms (in the histogram bucket "
        f"{_ms(bucket[0])}-{hi} ms), mean {_ms(lag.get('mean'))} ms, max {_ms(lag.get('max'))} ms"
    )


def load_generator_note(load_generator: dict[str, Any]) -> str:
    if load_generator.get("cpu_warning"):
        lines = "\n".join(f"    {line}" for line in load_generator.get("cpu_warning_lines", []))
        return (
            "**The load generator was a bottleneck.** locust reported that it ran out of CPU, so "
            "the request rate and the latencies above partly measure locust, not the server:\n\n"
            f"{lines}\n"
        )
    usage = load_generator.get("cpu_percent_per_process")
    note = (
        f"locust ran in {load_generator.get('processes')} process(es) and never reported a CPU "
        "warning (it warns above 90% of a core, checked every 10 s)"
        + ("" if usage is None else f"; it averaged {usage:.0f}% of a core per process")
        + ".\n"
    )
    if usage is not None and usage >= NEAR_SATURATION_PERCENT:
        note += (
            "\n**That is close to a full core**: the request rate is likely set by the load "
            "generator, so compare latency, loop lag and server CPU per request, not rps.\n"
        )
    return note


def _workers_section(server: dict[str, Any]) -> list[str]:
    """One row per server worker, when there are several (the block above sums them)."""
    workers = server.get("workers") or []
    if len(workers) < 2:
        return []
    lines = [
        f"## {len(workers)} server workers (one port, SO_REUSEPORT)",
        "",
        "Above: counts summed over the workers, each figure the worst worker's.",
        "",
        "| pid | peak open | accepted | requests | lag p99 ms | lag max ms | RSS MB peak "
        "| KB / connection | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in workers:
        lines.append(
            f"| {w['pid']} | {w['peak_open_connections']:,} | {w['accepted_connections']:,} "
            f"| {w['requests']:,} | {_ms(w['lag_ms']['p99'])} | {_ms(w['lag_ms']['max'])} "
            f"| {w['rss_mb_peak']:.1f} | {_num(w['rss_kb_per_connection'], '.2f')} "
            f"| {_num(w['cpu_s'], '.1f')} |"
        )
    return [*lines, ""]


def _limits_section(result: dict[str, Any]) -> list[str]:
    """The preflight's plan, the load generator's memory, and the machine's counters."""
    params, load = result["params"], result["load_generator"]
    plan = params.get("preflight")
    if not plan:
        return []
    sources = plan["sources"] or ["the default (127.0.0.1)"]
    lines = [
        "## Limits",
        "",
        f"- preflight: {plan['workers']} server process(es), each `--max-connections "
        f"{plan['max_connections_per_worker']:,}` (its fd limit minus the reserve); "
        f"{plan['locust_processes']} locust process(es); users connect from "
        f"{', '.join(sources)}; planned memory {plan['memory_mb_planned']:,} MB",
        "- changed on the machine: "
        + (", ".join(plan["machine_changes"]) if plan["machine_changes"] else "nothing"),
    ]
    lines += [f"- preflight note: {note}" for note in plan["notes"]]
    if load.get("rss_mb_peak") is not None:
        lines.append(
            f"- load generator memory: {load['rss_mb_peak']:,.0f} MB at peak over its processes "
            f"= {load['rss_kb_per_user']:.1f} KB per user (process bases included)"
        )
    if "time_wait_after" in params:
        lines.append(
            f"- machine-wide: {params['time_wait_before']:,} sockets in TIME_WAIT before, "
            f"{params['time_wait_after']:,} after; {params.get('listen_drops', 0):,} SYNs dropped "
            "on a full listen backlog during the run"
        )
    if result["delay_s"]:
        lines.append(
            f"- request rate: {result['rps']:,.1f} requests/s over the run "
            f"(users / delay = {result['users'] / result['delay_s']:,.0f} at most)"
        )
    return [*lines, ""]


def bench_report(result: dict[str, Any]) -> str:
    params = result["params"]
    server = result["server"]
    lat = result["latency_ms"]
    lines = [
        f"# loop-lab bench: {result['scenario']} on {result['loop']}",
        "",
        f"{params.get('started_at', '')} on {machine_line(result['machine'])}; 1-minute load "
        f"average {params.get('loadavg_1m_before', '?')} before, "
        f"{params.get('loadavg_1m_after', '?')} after; source {params.get('source') or '?'}.",
        "",
        "```",
        shlex.join(params.get("command", [])),
        "```",
        "",
        "| users | duration s | delay s | requests | failures | rps "
        "| p50 ms | p95 ms | p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['users']:,} | {result['duration_s']} | {result['delay_s']:g} "
        f"| {result['requests']:,} | {result['failures']:,} | {result['rps']:,.1f} "
        f"| {_ms(lat['p50'])} | {_ms(lat['p95'])} | {_ms(lat['p99'])} | {_ms(lat['max'])} |",
        "",
        "Latencies are client-side, from every request's exact time (locust's own report, in "
        "`locust.html`, rounds times above 10 s to whole seconds).",
        "",
        "## By request name",
        "",
        "| name | requests | failures | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["by_name"].items():
        lines.append(
            f"| `{name}` | {s['requests']:,} | {s['failures']:,} | {_ms(s['p50'])} "
            f"| {_ms(s['p95'])} | {_ms(s['p99'])} | {_ms(s['max'])} |"
        )
    lines += [
        "",
        "## Server",
        "",
        f"- loop lag: {lag_sentence(server['lag_ms'])}. p50/p99 are Prometheus "
        "`histogram_quantile` over the run's `looplab_loop_lag_seconds`; the max is exact.",
        f"- {server['lag_window_s']} s-window p99 from `/stats`: median "
        f"{_ms(server['lag_window_p99_ms']['median'])} ms, worst "
        f"{_ms(server['lag_window_p99_ms']['max'])} ms",
        f"- peak open connections: {server['peak_open_connections']:,}; accepted during the run: "
        f"{server['accepted_connections']:,} (for {result['requests']:,} requests)",
        f"- RSS: {server['rss_mb_baseline']:.1f} MB before the load, {server['rss_mb_peak']:.1f} "
        f"MB at peak = {_num(server['rss_kb_per_connection'], '.1f')} KB per peak connection",
        f"- server CPU: {_num(server['cpu_s'], '.1f')} s for {server['requests']:,} requests "
        f"= {_num(server['cpu_ms_per_request'], '.3f')} ms per request",
        f"- loop utilisation (the server's last 10 s, during the load): "
        f"{utilization_sentence(server)}",
        "",
    ]
    lines += _workers_section(server) + _limits_section(result)
    if result.get("phases"):
        names = sorted({n for row in result["phases"] for n in row["by_name"]})
        lines += [
            "## Phases",
            "",
            "| phase | s | loop lag p99 ms | " + " | ".join(f"`{n}` p99 ms" for n in names) + " |",
            "|---|---:|---:|" + "---:|" * len(names),
        ]
        for row in result["phases"]:
            cells = [_ms(row["by_name"][n]["p99"]) if n in row["by_name"] else "-" for n in names]
            lines.append(
                f"| {row['phase']} | {row['duration_s']:.0f} | {_ms(row['lag_ms']['p99'])} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    lines += [
        "## Load generator",
        "",
        load_generator_note(result["load_generator"]),
        "## Files",
        "",
        "`result.json` (these numbers), `overview.png`, `latency.png`, `lag.png`, "
        "`connections.png`, `rps.png`, `locust.html`, `locust_*.csv`, `locust.json`, "
        "`locust.log`, `server.log` (when the bench started the server), `server_stats.jsonl`, "
        "`samples/` (every request).",
        "",
    ]
    return "\n".join(lines)


def compare_report(data: dict[str, Any], command: Sequence[str]) -> str:
    summary, ratio = data["summary"], data["ratio"]
    lines = [
        f"# loop-lab compare: {data['scenario']}, asyncio vs uvloop",
        "",
        f"{data['started_at']} on {machine_line(data['machine'])}; source "
        f"{data.get('source') or '?'}. "
        f"{len(data['rounds']) // 2} rounds, alternating which loop goes first; each run has "
        f"{data['users']:,} users for {data['duration_s']} s.",
        "",
        "```",
        shlex.join(command),
        "```",
        "",
        "| loop | rps | p50 ms | p99 ms | loop lag p99 ms | loop utilisation "
        "| server CPU ms/request | RSS KB/connection |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for loop in ("asyncio", "uvloop"):
        s = summary[loop]
        lines.append(
            f"| {loop} | {s['rps']:,.1f} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} "
            f"| {_ms(s['lag_p99_ms'])} | {_pct(s.get('utilization'))} "
            f"| {_num(s.get('cpu_ms_per_request'), '.3f')} "
            f"| {_num(s.get('rss_kb_per_connection'), '.1f')} |"
        )
    lines += [
        "",
        "Medians over rounds. uvloop / asyncio, paired by round:",
        "",
        "| ratio | median | min | max | spread (max/min) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, r in ratio.items():
        lines.append(
            f"| {key} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {r['spread']:.3f} |"
        )
    lines += [
        "",
        "## Rounds",
        "",
        "| round | loop | rps | p99 ms | lag p99 ms | lag max ms | utilisation "
        "| server CPU ms/request | locust CPU % per process | CPU warning |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in data["rounds"]:
        res = run["result"]
        server, generator = res["server"], res["load_generator"]
        util = (server.get("utilization") or {}).get("median")
        lines.append(
            f"| {run['round']} | {run['loop']} | {res['rps']:,.1f} "
            f"| {_ms(res['latency_ms']['p99'])} | {_ms(server['lag_ms']['p99'])} "
            f"| {_ms(server['lag_ms']['max'])} | {_pct(util)} "
            f"| {_num(server.get('cpu_ms_per_request'), '.3f')} "
            f"| {_num(generator.get('cpu_percent_per_process'), '.0f')} "
            f"| {'yes' if generator['cpu_warning'] else 'no'} |"
        )
    warned = [r for r in data["rounds"] if r["result"]["load_generator"]["cpu_warning"]]
    lines += ["", "## Notes", ""]
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    if warned:
        lines.append(
            f"- **{len(warned)} of {len(data['rounds'])} runs hit locust's CPU warning**: "
            "in those, the load generator, not the loop, limited the rate."
        )
    if data.get("sweep"):
        lines += [
            "",
            "## Sweep",
            "",
            "| users | loop | workers | rps | p99 ms | loop lag p99 ms (per worker) "
            "| lag max ms (per worker) | KB per connection | accepted | locust CPU % "
            "| CPU warning |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for point in data["sweep"]:
            res = point["result"]
            server = res["server"]
            per_worker = server.get("workers") or [server]
            lines.append(
                f"| {point['users']:,} | {point['loop']} | {len(per_worker)} "
                f"| {res['rps']:,.1f} | {_ms(res['latency_ms']['p99'])} "
                f"| {' / '.join(_ms(w['lag_ms']['p99']) for w in per_worker)} "
                f"| {' / '.join(_ms(w['lag_ms']['max']) for w in per_worker)} "
                f"| {_num(server['rss_kb_per_connection'], '.1f')} "
                f"| {server['accepted_connections']:,} "
                f"| {_num(res['load_generator'].get('cpu_percent_per_process'), '.0f')} "
                f"| {'yes' if res['load_generator']['cpu_warning'] else 'no'} |"
            )
    lines += ["", "Plots: `compare.png`" + (", `sweep.png`" if data.get("sweep") else ""), ""]
    return "\n".join(lines)
