"""What loop-lab's instrumentation costs in requests per second: loop-lab vs a bare aiohttp server.

The servers run at once, each a single process on the same loop, pinned to the same CPU; wrk
runs on another CPU. Each round starts fresh servers (one process of the same code runs steadily
a few percent faster or slower than the next), runs them back to back on each path (which goes
first rotates by round) and pairs that round's ratios. `--otel` adds the bare server under
OpenTelemetry's aiohttp instrumentation. rps swing 10-30% on a shared machine: the verdict on
per-request cost is scripts/instructions.py; this is the figure beside it.

Its own targets (median over rounds, per loop): `/healthz` loop-lab >= 0.95 x bare,
`/await?delay=0` >= 0.85 x bare (scripts/bare_server.py does the same work, unmonitored).

    python scripts/overhead.py --rounds 5 --duration 10 [--otel]

Exit status: 0 all targets met (or --no-targets), 1 a target missed, 2 it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `app` importable
    sys.path.insert(0, str(ROOT))

from app.bench.wrk import WrkError, WrkResult, parse_wrk  # noqa: E402
from app.launch import ProcessError, ServerProcess, serve_command  # noqa: E402
from app.monitor.process import cpu_seconds  # noqa: E402

BARE_SERVER = ROOT / "scripts" / "bare_server.py"
LOOPS = ("asyncio", "uvloop")
# path -> the lowest acceptable median of loop-lab rps / bare rps
TARGETS: dict[str, float] = {"/healthz": 0.95, "/await?delay=0": 0.85}
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 30.0

# wrk's output is read by app.bench.wrk (loop-lab matrix drives wrk too); its error is this
# script's "the measurement could not be made" (missing tool, server did not start, wrk failed)
BenchError = WrkError


# -- ratios -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values")
    return Spread(statistics.median(values), min(values), max(values))


def paired_ratios(bare: Sequence[float], lab: Sequence[float]) -> list[float]:
    """loop-lab / bare for each round (the two runs of a round were measured back to back)."""
    if len(bare) != len(lab):
        raise ValueError(f"unpaired rounds: {len(bare)} bare vs {len(lab)} loop-lab")
    return [lab_rps / bare_rps for bare_rps, lab_rps in zip(bare, lab, strict=True)]


@dataclass
class PathResult:
    loop: str
    path: str
    target: float
    bare_rps: list[float] = field(default_factory=list)
    lab_rps: list[float] = field(default_factory=list)
    # server CPU time per request (µs): what each request cost the server, whatever share of
    # the CPU other processes left it; empty where /proc is missing
    bare_cpu_us: list[float] = field(default_factory=list)
    lab_cpu_us: list[float] = field(default_factory=list)
    # bare + OpenTelemetry, when measured (--otel)
    otel_rps: list[float] = field(default_factory=list)
    otel_cpu_us: list[float] = field(default_factory=list)

    @property
    def otel_ratios(self) -> list[float]:
        """bare + OpenTelemetry rps / bare rps, paired by round."""
        return paired_ratios(self.bare_rps, self.otel_rps) if self.otel_rps else []

    @property
    def ratios(self) -> list[float]:
        return paired_ratios(self.bare_rps, self.lab_rps)

    @property
    def cpu_ratios(self) -> list[float]:
        """bare CPU per request / loop-lab CPU per request: the rps ratio a quiet CPU would give."""
        return paired_ratios(self.lab_cpu_us, self.bare_cpu_us)

    @property
    def ratio(self) -> Spread:
        return spread(self.ratios)

    @property
    def met(self) -> bool:
        return self.ratio.median >= self.target

    def summary(self) -> dict[str, Any]:
        return {
            "loop": self.loop,
            "path": self.path,
            "target": self.target,
            "bare_rps": self.bare_rps,
            "lab_rps": self.lab_rps,
            "bare_rps_median": statistics.median(self.bare_rps),
            "lab_rps_median": statistics.median(self.lab_rps),
            "ratios": self.ratios,
            "ratio": asdict(self.ratio),
            "met": self.met,
            "bare_cpu_us_per_request": self.bare_cpu_us,
            "lab_cpu_us_per_request": self.lab_cpu_us,
            "cpu_ratios": self.cpu_ratios,
            "cpu_ratio": asdict(spread(self.cpu_ratios)) if self.cpu_ratios else None,
            "otel_rps": self.otel_rps,
            "otel_ratios": self.otel_ratios,
            "otel_cpu_us_per_request": self.otel_cpu_us,
        }


def markdown_table(results: Sequence[PathResult]) -> str:
    otel = any(r.otel_rps for r in results)
    lines = [
        "| loop | path | bare rps | loop-lab rps | ratio median | min | max | target | met "
        "| CPU µs/req bare | loop-lab | CPU ratio |"
        + (" OpenTelemetry rps | ratio median | CPU µs/req |" if otel else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
        + ("---:|---:|---:|" if otel else ""),
    ]
    for r in results:
        ratio = r.ratio
        cpu = (
            f"{statistics.median(r.bare_cpu_us):.1f} | {statistics.median(r.lab_cpu_us):.1f} "
            f"| {statistics.median(r.cpu_ratios):.3f}"
            if r.cpu_ratios
            else "- | - | -"
        )
        lines.append(
            f"| {r.loop} | `{r.path}` | {statistics.median(r.bare_rps):,.0f} "
            f"| {statistics.median(r.lab_rps):,.0f} | {ratio.median:.3f} | {ratio.min:.3f} "
            f"| {ratio.max:.3f} | ≥ {r.target:.2f} | {'yes' if r.met else 'NO'} | {cpu} |"
            + (
                f" {statistics.median(r.otel_rps):,.0f} | {statistics.median(r.otel_ratios):.3f} "
                f"| {statistics.median(r.otel_cpu_us) if r.otel_cpu_us else 0:.1f} |"
                if r.otel_rps
                else (" - | - | - |" if otel else "")
            )
        )
    return "\n".join(lines)


# -- processes ----------------------------------------------------------------------------------


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """Prefix `taskset -c CPU` when pinning is on (cpu is not None)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def choose_cpus(server_cpu: int, client_cpu: int) -> tuple[int | None, int | None]:
    """Pin only when taskset exists and both CPUs are ours to use."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if shutil.which("taskset") and {server_cpu, client_cpu} <= allowed and server_cpu != client_cpu:
        return server_cpu, client_cpu
    return None, None


@asynccontextmanager
async def run_server(name: str, command: list[str], log_dir: Path) -> AsyncIterator[ServerProcess]:
    """Start `command` (it must log `... on http://HOST:PORT`), yield once it serves, then stop."""
    server = ServerProcess(command=command, log_path=log_dir / f"{name}.log")
    await server.start(within=SERVER_START_TIMEOUT_S)
    try:
        yield server
    finally:
        await server.stop(grace=SERVER_STOP_TIMEOUT_S)


def bare_command(loop: str, cpu: int | None, *, otel: bool = False) -> list[str]:
    """The bare reference server; with `otel`, under OpenTelemetry's instrumentation."""
    command = [sys.executable, str(BARE_SERVER), "--loop", loop, "--port", "0"]
    return pinned([*command, "--otel"] if otel else command, cpu)


def lab_command(loop: str, cpu: int | None) -> list[str]:
    """`loop-lab serve` (as `python -m app serve`), one process, defaults otherwise."""
    return pinned([*serve_command("--loop", loop, "--workers", "1")], cpu)


# -- wrk ----------------------------------------------------------------------------------------


def find_wrk(install: bool, out: TextIO) -> str:
    """wrk's path; installs Debian's wrk with apt-get when allowed and possible."""
    path = shutil.which("wrk")
    if path:
        return path
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        print("wrk not found: installing it with apt-get", file=out, flush=True)
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
        path = shutil.which("wrk")
        if path:
            return path
    raise BenchError(
        "wrk not found; install it (Debian: apt-get install wrk)"
        + ("" if install else " or drop --no-install")
    )


def run_wrk(wrk: str, url: str, duration: float, connections: int, cpu: int | None) -> WrkResult:
    command = pinned([wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", url], cpu)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


# -- the measurement ----------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int
    duration: float
    warmup: float
    connections: int
    loops: list[str]
    server_cpu: int | None
    client_cpu: int | None
    otel: bool = False


async def measure_loop(
    wrk: str, loop: str, options: Options, log_dir: Path, out: TextIO
) -> list[PathResult]:
    results = [PathResult(loop, path, target) for path, target in TARGETS.items()]
    commands = {
        "bare": bare_command(loop, options.server_cpu),
        "lab": lab_command(loop, options.server_cpu),
    }
    if options.otel:
        commands["otel"] = bare_command(loop, options.server_cpu, otel=True)
    for round_no in range(1, options.rounds + 1):
        # Fresh server processes every round: one instance of the same code runs a steady 2-5%
        # faster or slower than another (hash seed, memory layout), as much as the gap measured,
        # so the median must be over instances, not over runs of one.
        async with AsyncExitStack() as stack:
            servers = {
                side: await stack.enter_async_context(
                    run_server(f"{side}-{loop}-{round_no}", command, log_dir)
                )
                for side, command in commands.items()
            }
            if round_no == 1:
                urls = "  ".join(f"{side} {server.url}" for side, server in servers.items())
                print(f"[{loop}] {urls} (new each round)", file=out)
            if options.warmup > 0:
                for result in results:
                    for server in servers.values():
                        await asyncio.to_thread(
                            run_wrk,
                            wrk,
                            server.url + result.path,
                            options.warmup,
                            options.connections,
                            options.client_cpu,
                        )
            # which side runs first rotates, so drift within a round favours none
            sides = list(servers)
            shift = (round_no - 1) % len(sides)
            order = sides[shift:] + sides[:shift]
            for result in results:
                rps: dict[str, float] = {}
                cpu: dict[str, float] = {}
                for side in order:
                    server = servers[side]
                    cpu_before = cpu_seconds(server.pid)
                    run = await asyncio.to_thread(
                        run_wrk,
                        wrk,
                        server.url + result.path,
                        options.duration,
                        options.connections,
                        options.client_cpu,
                    )
                    if not run.clean:
                        raise BenchError(
                            f"{side} {result.path}: {run.non_2xx} non-2xx responses, "
                            f"{run.socket_errors} socket errors in {run.requests} requests"
                        )
                    cpu_after = cpu_seconds(server.pid)
                    rps[side] = run.rps
                    if cpu_before is not None and cpu_after is not None:
                        cpu[side] = (cpu_after - cpu_before) * 1e6 / run.requests
                result.bare_rps.append(rps["bare"])
                result.lab_rps.append(rps["lab"])
                if "bare" in cpu and "lab" in cpu:
                    result.bare_cpu_us.append(cpu["bare"])
                    result.lab_cpu_us.append(cpu["lab"])
                if "otel" in rps:
                    result.otel_rps.append(rps["otel"])
                    if "otel" in cpu:
                        result.otel_cpu_us.append(cpu["otel"])
                figures = "  ".join(
                    f"{side} {rps[side]:>9,.0f} rps"
                    + (f" ({cpu[side]:.1f} CPU µs/req)" if side in cpu else "")
                    for side in sides
                )
                print(
                    f"[{loop}] round {round_no} {result.path:<16} {figures}  "
                    f"ratio {rps['lab'] / rps['bare']:.3f}",
                    file=out,
                    flush=True,
                )
    return results


async def measure(wrk: str, options: Options, out: TextIO) -> list[PathResult]:
    results: list[PathResult] = []
    with tempfile.TemporaryDirectory(prefix="looplab-overhead-") as tmp:
        for loop in options.loops:
            results.extend(await measure_loop(wrk, loop, options, Path(tmp), out))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="loop-lab's instrumentation overhead vs bare aiohttp, measured with wrk."
    )
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per loop and path")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of wrk on each fresh server before its round",
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated loops")
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU both servers are pinned to")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU wrk is pinned to")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--otel",
        action="store_true",
        help="also measure the bare server under OpenTelemetry (the bench extra)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="fail instead of apt-get installing wrk"
    )
    parser.add_argument(
        "--no-targets", action="store_true", help="report only; exit 0 even if a target is missed"
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = sorted(set(loops) - set(LOOPS))
    if unknown or not loops or args.rounds < 1 or args.duration < 1 or args.connections < 1:
        print(
            f"overhead: need loops from {', '.join(LOOPS)} (got {args.loops!r}), "
            "--rounds >= 1, --duration >= 1, --connections >= 1",
            file=sys.stderr,
        )
        return 2
    server_cpu, client_cpu = choose_cpus(args.server_cpu, args.client_cpu)
    options = Options(
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        loops=loops,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        otel=args.otel,
    )
    try:
        wrk = find_wrk(install=not args.no_install, out=out)
        pinning = (
            f"servers on CPU {server_cpu}, wrk on CPU {client_cpu}"
            if server_cpu is not None
            else "no CPU pinning (taskset or a second CPU missing)"
        )
        print(
            f"overhead: {options.rounds} rounds x {options.duration:g}s, "
            f"{options.connections} connections, {pinning}",
            file=out,
            flush=True,
        )
        results = asyncio.run(measure(wrk, options, out))
    except (BenchError, ProcessError, subprocess.TimeoutExpired) as exc:
        print(f"overhead: {exc}", file=sys.stderr)
        return 2
    print("\n" + markdown_table(results), file=out, flush=True)
    if args.json is not None:
        report = {
            "rounds": options.rounds,
            "duration_s": options.duration,
            "connections": options.connections,
            "pinned": server_cpu is not None,
            "results": [r.summary() for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    missed = [r for r in results if not r.met]
    for r in missed:
        print(
            f"overhead: target missed: {r.loop} {r.path} median ratio {r.ratio.median:.3f} "
            f"< {r.target:.2f}",
            file=sys.stderr,
        )
    return 1 if missed and not args.no_targets else 0


if __name__ == "__main__":
    sys.exit(main())
