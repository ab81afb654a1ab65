"""CPU instructions per request, loop-lab vs bare aiohttp: the overhead without the machine's noise.

`scripts/overhead.py` measures what matters (requests per second, CPU time per request) but on a
shared machine its rounds swing by 10-20%. This counts instructions instead, which do not depend
on what else the machine is doing: each server runs under valgrind's callgrind, once for N1 and
once for N2 keep-alive requests over C connections, and (instructions(N2) - instructions(N1)) /
(N2 - N1) is what one request costs, startup and shutdown cancelled out.

Instructions are not time (cache misses and branch mispredictions are not in them), and under
valgrind the server runs ~50x slower, so work done on a clock rather than per request (the lag
sampler's 20 ms tick, the watchdog thread, `--gc tuned`'s 50 ms young collections) counts ~50x too
heavily here: read the loop-lab figure as an upper bound. It is the tool for finding where a
request's cost goes (switch a part off, count again); overhead.py is the one for the targets.

    python scripts/instructions.py --loops asyncio,uvloop --path /healthz
    python scripts/instructions.py --loops asyncio --lab-arg=--gc --lab-arg=default

Needs valgrind (Debian: apt-get install valgrind). Exit status 0, or 2 if it could not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `scripts.overhead` importable
    sys.path.insert(0, str(ROOT))

from scripts.overhead import (  # noqa: E402
    LOOPS,
    BenchError,
    Server,
    _wait_ready,
    bare_command,
    child_env,
    lab_command,
    stop_server,
)

# valgrind's own summary line at exit, e.g. "==123== Collected : 1416982596"
_COLLECTED = re.compile(r"^==\d+== Collected : (\d+)$", re.M)
START_TIMEOUT_S = 300.0  # startup under valgrind is slow (imports, the process pool's spawn)


def collected(valgrind_log: str) -> int:
    """The instruction count callgrind reports when the process exits."""
    match = _COLLECTED.search(valgrind_log)
    if match is None:
        raise BenchError(f"no 'Collected' line in valgrind's log:\n{valgrind_log[-2000:]}")
    return int(match.group(1))


def per_request(count_small: int, count_large: int, small: int, large: int) -> float:
    """Instructions one request costs: the difference of two runs over their request counts."""
    if large <= small:
        raise ValueError("the second run must send more requests than the first")
    return (count_large - count_small) / (large - small)


async def _keep_alive_client(host: str, port: int, path: str, requests: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    try:
        for _ in range(requests):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"{path}: {head.splitlines()[0]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
    finally:
        writer.close()


async def send_requests(url: str, path: str, requests: int, connections: int) -> None:
    """`requests` GETs of `path`, spread over `connections` keep-alive connections, like wrk."""
    host, _, port = url.removeprefix("http://").partition(":")
    share, extra = divmod(requests, connections)
    await asyncio.gather(
        *(
            _keep_alive_client(host, int(port), path, share + (1 if i < extra else 0))
            for i in range(connections)
        )
    )


def count_instructions(
    command: list[str], path: str, requests: int, connections: int, work: Path, name: str
) -> int:
    """Run `command` under callgrind, send it `requests`, stop it; its instruction count."""
    valgrind_log = work / f"{name}.valgrind"
    profile = work / f"{name}.callgrind"
    wrapped = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={profile}",
        f"--log-file={valgrind_log}",
        *command,
    ]
    log_path = work / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            wrapped,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=child_env(),
        )
    server = Server(name, process, log_path)
    try:
        _wait_ready(server, time.monotonic() + START_TIMEOUT_S)
        asyncio.run(send_requests(server.url, path, requests, connections))
    finally:
        stop_server(server)
    return collected(valgrind_log.read_text(errors="replace"))


@dataclass
class Row:
    loop: str
    path: str
    bare: float
    lab: float

    @property
    def extra(self) -> float:
        return self.lab - self.bare

    @property
    def ratio(self) -> float:
        """bare / loop-lab: the throughput ratio if time followed instructions."""
        return self.bare / self.lab


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| loop | path | bare instructions / request | loop-lab | extra | bare / loop-lab |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.loop} | `{r.path}` | {r.bare:,.0f} | {r.lab:,.0f} | {r.extra:+,.0f} "
            f"({r.extra / r.bare:+.1%}) | {r.ratio:.3f} |"
        )
    return "\n".join(lines)


def measure_loop(
    loop: str, args: argparse.Namespace, runs: tuple[int, int], work: Path, out: TextIO
) -> Row:
    """Bare and loop-lab on `loop`: two callgrind runs each, one figure per request each."""
    figures: dict[str, float] = {}
    for side, command in (
        ("bare", bare_command(loop, None)),
        ("loop-lab", [*lab_command(loop, None), *args.lab_arg]),
    ):
        counts = [
            count_instructions(command, args.path, n, args.connections, work, f"{side}-{loop}-{n}")
            for n in runs
        ]
        figures[side] = per_request(counts[0], counts[1], *runs)
        print(
            f"[{loop}] {side:<8} {args.path}: {figures[side]:,.0f} instructions per request",
            file=out,
            flush=True,
        )
    return Row(loop, args.path, figures["bare"], figures["loop-lab"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated loops")
    parser.add_argument("--path", default="/healthz", help="the path every request asks for")
    parser.add_argument(
        "--requests",
        default="1000,5000",
        help="N1,N2: requests of the two runs per server (default 1000,5000)",
    )
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    parser.add_argument(
        "--lab-arg",
        action="append",
        default=[],
        help="extra argument for `loop-lab serve` (repeat), e.g. --lab-arg=--gc --lab-arg=default",
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    try:
        small, large = (int(n) for n in args.requests.split(","))
    except ValueError:
        small = large = 0
    if set(loops) - set(LOOPS) or not loops or not 0 < small < large or args.connections < 1:
        print(
            f"instructions: need loops from {', '.join(LOOPS)}, --requests N1,N2 with "
            "0 < N1 < N2, --connections >= 1",
            file=sys.stderr,
        )
        return 2
    if shutil.which("valgrind") is None:
        print(
            "instructions: valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr
        )
        return 2
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="looplab-instructions-") as tmp:
            for loop in loops:
                rows.append(measure_loop(loop, args, (small, large), Path(tmp), out))
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"instructions: {exc}", file=sys.stderr)
        return 2
    print("\n" + markdown_table(rows), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
