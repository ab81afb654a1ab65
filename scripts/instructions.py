"""CPU instructions per request under callgrind: bare aiohttp, bare + OpenTelemetry, loop-lab.

Instructions do not depend on what else the machine is doing, so this is the verdict on what the
monitor costs per request (`scripts/overhead.py` gives the rps beside it). Each server runs once
per loop under valgrind's callgrind. After warm-up requests, each path gets a batch of N1 and a
batch of N2 keep-alive requests over C connections, and after each batch callgrind is asked for a
dump (`callgrind_control --dump`), which holds the instructions since the one before: (batch N2 -
batch N1) / (N2 - N1) is one request, the dumps and the idle moments between batches cancelled out.

Under valgrind a server runs ~50x slower, so work done on a clock rather than per request would
count ~50x too heavily: loop-lab runs with its clocks slowed 50x to match and `--gc default`
(CPython's own collector, as the bare servers have it) unless told otherwise
(app.bench.instructions.SERVE_ARGS); what a clock still does per idle second is printed apart.

    python scripts/instructions.py --loops asyncio,uvloop

Needs valgrind (Debian: apt-get install valgrind) and the `bench` extra (OpenTelemetry).
Exit status: 0 all targets met, 1 a target missed, 2 it could not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `app` and `scripts` importable
    sys.path.insert(0, str(ROOT))

from app.bench.instructions import SERVE_ARGS, dump_count, per_request_counts  # noqa: E402
from app.launch import ServerProcess  # noqa: E402
from scripts.overhead import LOOPS, BenchError, bare_command, lab_command  # noqa: E402

PATHS = ("/healthz", "/await?delay=0")
# path -> the most loop-lab may add to a bare server's instructions per request
TARGETS: dict[str, float] = {"/healthz": 0.15, "/await?delay=0": 0.20}
OTEL_SHARE = 1 / 20  # loop-lab's addition may be at most this share of OpenTelemetry's
START_TIMEOUT_S = 900.0  # startup under valgrind: imports, the pools' spawn (minutes if loaded)


async def measure_server(
    command: list[str], batch_sizes: tuple[int, int], connections: int, work: Path, name: str
) -> dict[str, float]:
    """Run `command` under callgrind; instructions per request of each path in PATHS."""
    profile = work / f"{name}.callgrind"
    wrapped = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={profile}",
        f"--log-file={work / f'{name}.valgrind'}",
        *command,
    ]
    server = ServerProcess(command=wrapped, log_path=work / f"{name}.log")
    dumps = 0

    async def dump() -> int:
        """Ask callgrind for a dump now; the instructions since the previous one."""
        nonlocal dumps
        control = await asyncio.create_subprocess_exec(
            "callgrind_control",
            f"--dump={name}-{dumps + 1}",
            str(server.pid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said, _ = await asyncio.wait_for(control.communicate(), 120)
        if control.returncode != 0:
            raise BenchError(f"callgrind_control failed: {said.decode(errors='replace')}")
        dumps += 1
        part = Path(f"{profile}.{dumps}")
        return dump_count(await asyncio.to_thread(part.read_text, errors="replace"))

    await server.start(within=START_TIMEOUT_S)
    try:
        batches = dict.fromkeys(PATHS, batch_sizes)
        clock_per_s, counts = await per_request_counts(server.url, batches, connections, dump)
    finally:
        await server.stop()
    figures = {"clock/s": clock_per_s}
    for path, count in counts.items():
        figures[path] = count.counted
        figures[f"{path} unclocked"] = count.unclocked
    return figures


@dataclass
class Row:
    loop: str
    path: str
    bare: float
    otel: float
    lab: float
    # each without its clock-driven share of the batches (instructions per idle second x the
    # batch's wall time): what work on a timer or a thread counts ~50x under valgrind
    bare_unclocked: float = 0.0
    lab_unclocked: float = 0.0

    @property
    def lab_extra(self) -> float:
        return (self.lab - self.bare) / self.bare

    @property
    def otel_extra(self) -> float:
        return (self.otel - self.bare) / self.bare

    @property
    def lab_extra_unclocked(self) -> float:
        return (self.lab_unclocked - self.bare_unclocked) / self.bare_unclocked

    @property
    def share(self) -> float:
        """loop-lab's addition (without the clock's share) as a share of OpenTelemetry's."""
        return (self.lab_unclocked - self.bare_unclocked) / (self.otel - self.bare)

    @property
    def met(self) -> bool:
        """Judged without the clock's share: valgrind stretches wall time ~50x (more on a busy
        machine), and timer work counted per request would grow with it. The clock's own cost is
        printed per idle second instead, the rate it has at full speed too."""
        return self.lab_extra_unclocked <= TARGETS[self.path] and self.share <= OTEL_SHARE


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| loop | path | bare | bare + OpenTelemetry | loop-lab | loop-lab adds | target "
        "| OpenTelemetry adds | without the clock's share: bare | loop-lab | adds "
        "| loop-lab's addition / OpenTelemetry's | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.loop} | `{r.path}` | {r.bare:,.0f} | {r.otel:,.0f} | {r.lab:,.0f} "
            f"| {r.lab - r.bare:+,.0f} ({r.lab_extra:+.1%}) | ≤ {TARGETS[r.path]:.0%} "
            f"| {r.otel - r.bare:+,.0f} ({r.otel_extra:+.1%}) | {r.bare_unclocked:,.0f} "
            f"| {r.lab_unclocked:,.0f} | {r.lab_extra_unclocked:+.1%} "
            f"| {r.share:.3f} (≤ {OTEL_SHARE:.2f}) | {'yes' if r.met else 'NO'} |"
        )
    return "\n".join(lines)


def measure_loop(loop: str, args: argparse.Namespace, work: Path, out: TextIO) -> list[Row]:
    """The three servers on `loop`, one callgrind run each."""
    sides = {
        "bare": bare_command(loop, None),
        "otel": bare_command(loop, None, otel=True),
        "loop-lab": [*lab_command(loop, None), *args.lab_arg],
    }
    figures: dict[str, dict[str, float]] = {}
    for side, command in sides.items():
        if side not in args.sides:
            continue
        figures[side] = asyncio.run(
            measure_server(command, args.batches, args.connections, work, f"{side}-{loop}")
        )
        print(
            f"[{loop}] {side:<8} idle: {figures[side]['clock/s']:,.0f} instructions per second",
            file=out,
            flush=True,
        )
        for path in PATHS:
            print(
                f"[{loop}] {side:<8} {path:<16} {figures[side][path]:>11,.0f} instructions per "
                f"request ({figures[side][path + ' unclocked']:,.0f} without the clock's share)",
                file=out,
                flush=True,
            )
    if len(figures) < len(sides):
        return []  # a partial run (--sides) prints its figures only
    lab = figures["loop-lab"]
    return [
        Row(
            loop,
            path,
            figures["bare"][path],
            figures["otel"][path],
            lab[path],
            figures["bare"][f"{path} unclocked"],
            lab[f"{path} unclocked"],
        )
        for path in PATHS
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated loops")
    parser.add_argument(
        "--requests",
        default="500,2500",
        help="N1,N2: requests of the two batches per path (default 500,2500)",
    )
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    parser.add_argument(
        "--sides",
        default="bare,otel,loop-lab",
        help="which servers to measure (the table needs all three)",
    )
    parser.add_argument(
        "--keep", type=Path, help="keep callgrind's dumps and logs in this directory"
    )
    parser.add_argument(
        "--lab-arg",
        action="append",
        default=None,
        help="argument for `loop-lab serve` (repeat; default: " + " ".join(SERVE_ARGS) + ")",
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.lab_arg is None:
        args.lab_arg = list(SERVE_ARGS)
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    args.sides = {name.strip() for name in args.sides.split(",") if name.strip()}
    try:
        args.batches = tuple(int(n) for n in args.requests.split(","))
    except ValueError:
        args.batches = ()
    if (
        set(loops) - set(LOOPS)
        or not loops
        or len(args.batches) != 2
        or not 0 < args.batches[0] < args.batches[1]
        or args.connections < 1
        or not args.sides <= {"bare", "otel", "loop-lab"}
    ):
        print(
            f"instructions: need loops from {', '.join(LOOPS)}, --requests N1,N2 with "
            "0 < N1 < N2, --connections >= 1",
            file=sys.stderr,
        )
        return 2
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(
                f"instructions: {tool} not found (Debian: apt-get install valgrind)",
                file=sys.stderr,
            )
            return 2
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="looplab-instructions-") as tmp:
            work = args.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            for loop in loops:
                rows.extend(measure_loop(loop, args, work, out))
    except (BenchError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"instructions: {exc}", file=sys.stderr)
        return 2
    if rows:
        print("\n" + markdown_table(rows), file=out, flush=True)
    missed = [r for r in rows if not r.met]
    for r in missed:
        print(f"instructions: target missed: {r.loop} {r.path}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
