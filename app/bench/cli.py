"""The `bench`, `compare` and `matrix` subcommands of `loop-lab`."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from app.bench.scenarios import SCENARIOS, ScenarioError
from app.loops import LOOP_NAMES, LoopName

if TYPE_CHECKING:
    from app.bench.bench import BenchConfig

MAX_USERS = 10_000_000  # the preflight refuses what this machine cannot hold
MAX_DURATION_S = 3600


def _bounded(kind: Callable[[str], float], lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be in {lo:g}..{hi:g}, got {text}")
        return value

    return parse


def _int(lo: int, hi: int) -> Callable[[str], int]:
    parse = _bounded(int, lo, hi)
    return lambda text: int(parse(text))


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be an http(s)://host:port URL, got {text!r}")
    return text.rstrip("/")


def _levels(text: str) -> tuple[int, ...]:
    parse = _int(1, MAX_USERS)
    try:
        levels = tuple(parse(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"--sweep: {exc}") from None
    if not levels:
        raise argparse.ArgumentTypeError("--sweep needs user counts, e.g. 100,1000,5000,10000")
    return tuple(sorted(set(levels)))


def _add_load_options(parser: argparse.ArgumentParser, *, users: int, duration: int) -> None:
    parser.add_argument(
        "--users",
        type=_int(1, MAX_USERS),
        default=users,
        help=f"concurrent users (default {users})",
    )
    parser.add_argument(
        "--spawn-rate",
        type=_bounded(float, 0.1, 10_000),
        default=None,
        help="users started per second (default: ramp up over min(10 s, a quarter of the run))",
    )
    parser.add_argument(
        "--duration",
        type=_int(1, MAX_DURATION_S),
        default=duration,
        help=f"seconds of load (default {duration})",
    )
    parser.add_argument(
        "--delay",
        type=_bounded(float, 0, 600),
        default=1.0,
        help="seconds each /await request waits on the server (default 1)",
    )
    parser.add_argument(
        "--block",
        type=_bounded(float, 0, 60),
        default=0.2,
        help="seconds each /block or /offload request holds (default 0.2)",
    )
    parser.add_argument(
        "--blockers",
        type=_int(0, 1000),
        default=2,
        help="users sending /block or /offload, or /cpu per way in the cpu scenario (default 2)",
    )
    parser.add_argument(
        "--processes",
        type=_int(1, 64),
        default=None,
        help="locust processes (default: 1 up to 2,000 users, then one per 5,000, up to the cores)",
    )
    parser.add_argument(
        "--workers",
        type=_int(1, 64),
        default=1,
        help="server processes sharing the port with SO_REUSEPORT; the bench reads each one's "
        "/stats (default 1; with --target: how many the running server has)",
    )
    parser.add_argument(
        "--sources",
        type=_int(0, 250),
        default=0,
        help="loopback addresses (127.0.0.1, .2, ...) the users connect from, each with its own "
        "ephemeral ports (default 0: as many as the users need)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no live progress display on stderr"
    )


def _bench_config(args: argparse.Namespace, out: Path, loop: LoopName) -> BenchConfig:
    from app.bench.bench import BenchConfig  # heavy (matplotlib, rich): only when running

    return BenchConfig(
        scenario=args.scenario,
        out=out,
        loop=loop,
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration_s=args.duration,
        delay_s=args.delay,
        block_s=args.block,
        blockers=args.blockers,
        target=getattr(args, "target", None),
        max_failures=getattr(args, "max_failures", None),
        processes=args.processes,
        workers=args.workers,
        sources=args.sources,
        progress=not args.no_progress,
        command=tuple(["loop-lab", *sys.argv[1:]]),
    )


def _bench(args: argparse.Namespace) -> int:
    from app.bench.bench import BenchError, run_bench, summary_line
    from app.bench.preflight import PreflightError
    from app.launch import ProcessError

    loop = cast(LoopName, args.loop)
    out = args.out or Path("results") / f"bench-{args.scenario}-{loop}-{args.users}"
    config = _bench_config(args, Path(out), loop)
    try:
        plan = config.plan()
    except PreflightError as exc:
        print(f"loop-lab bench: refused before starting: {exc}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"preflight: {note}", file=sys.stderr)
    try:
        outcome = asyncio.run(run_bench(config))
    except (ScenarioError, ProcessError, BenchError) as exc:
        print(f"loop-lab bench: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("loop-lab bench: interrupted", file=sys.stderr)
        return 130
    print(summary_line(outcome.result))
    print(f"results in {outcome.out}/ (report.md, result.json, *.png, locust.html)")
    if outcome.exit_code:
        print(f"loop-lab bench: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


def _compare(args: argparse.Namespace) -> int:
    from app.bench.bench import BenchError
    from app.bench.compare import CompareConfig, run_compare
    from app.bench.preflight import PreflightError
    from app.launch import ProcessError

    if (args.asyncio_url is None) != (args.uvloop_url is None):
        print(
            "loop-lab compare: give both --asyncio-url and --uvloop-url, or neither",
            file=sys.stderr,
        )
        return 2
    urls: dict[LoopName, str] | None = None
    if args.asyncio_url is not None:
        urls = {"asyncio": args.asyncio_url, "uvloop": args.uvloop_url}
    out = Path(args.out or Path("results") / f"compare-{args.scenario}")
    base = _bench_config(args, out, "asyncio")
    config = CompareConfig(base=base, rounds=args.rounds, urls=urls, sweep=args.sweep or ())
    try:
        config.preflight()
    except PreflightError as exc:
        print(f"loop-lab compare: refused before starting: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = asyncio.run(
            run_compare(config, ["loop-lab", *sys.argv[1:]], lambda s: print(s, flush=True))
        )
    except (ScenarioError, ProcessError, BenchError) as exc:
        print(f"loop-lab compare: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("loop-lab compare: interrupted", file=sys.stderr)
        return 130
    data = outcome.data
    for key, r in data["ratio"].items():
        print(
            f"uvloop/asyncio {key}: median {r['median']:.3f} "
            f"(min {r['min']:.3f}, max {r['max']:.3f}, spread {r['spread']:.3f})"
        )
    for note in data["notes"]:
        print(f"note: {note}")
    print(f"results in {out}/ (compare.md, compare.json, compare.png)")
    return outcome.exit_code


def _pythons(text: str) -> tuple[str, ...]:
    versions = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [v for v in versions if not re.fullmatch(r"3\.\d{1,2}", v)]
    if not versions or bad:
        raise argparse.ArgumentTypeError(f"--pythons takes versions like 3.11,3.14, got {text!r}")
    return tuple(dict.fromkeys(versions))


def _matrix(args: argparse.Namespace) -> int:
    from app.bench.matrix import MatrixConfig, MatrixError, combine, run_matrix
    from app.bench.matrix_report import broken_cells, matrix_notes, matrix_plots, matrix_report
    from app.bench.results import write_json
    from app.bench.wrk import WrkError
    from app.launch import ProcessError

    out = Path(args.out or Path("results") / "matrix")
    command = ("loop-lab", *sys.argv[1:])
    extra = {"context": args.context, "command": command, "standins": args.standins}
    if args.quick:
        config = MatrixConfig.quick(out, args.pythons, **extra)
    else:
        config = MatrixConfig(
            out=out,
            pythons=args.pythons,
            rounds=args.rounds,
            instructions=args.instructions,
            **extra,
        )
    try:
        if args.combine:
            parts = [json.loads((d / "matrix.json").read_text()) for d in args.combine]
            out.mkdir(parents=True, exist_ok=True)
            data = combine(parts, command)
            write_json(out / "matrix.json", data)
        else:
            data = run_matrix(config, lambda s: print(s, flush=True))
    except (MatrixError, WrkError, ProcessError, OSError, json.JSONDecodeError) as exc:
        print(f"loop-lab matrix: {exc}", file=sys.stderr)
        return 3
    (out / "matrix.md").write_text(matrix_report(data), encoding="utf-8")
    matrix_plots(data, out)
    for note in matrix_notes(data):
        print(f"note: {note}")
    print(f"results in {out}/ (matrix.md, matrix.json, matrix-*.png)")
    broken = broken_cells(data)
    for line in broken:
        print(f"loop-lab matrix: {line}", file=sys.stderr)
    return 1 if broken else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bench`, `compare` and `matrix` to the `loop-lab` command."""
    scenario_help = "; ".join(f"{name}: {text}" for name, text in SCENARIOS.items())
    bench = commands.add_parser(
        "bench",
        help="run a locust scenario against a server and report",
        description="Start a server (unless --target), run a locust scenario headless, sample "
        "the server's /stats, and write result.json, report.md, plots and locust's reports. "
        f"Scenarios: {scenario_help}.",
    )
    bench.add_argument("scenario", choices=list(SCENARIOS), metavar="SCENARIO")
    bench.add_argument("--loop", choices=LOOP_NAMES, default="asyncio", help="server loop")
    _add_load_options(bench, users=1000, duration=60)
    bench.add_argument("--target", type=_url, help="bench this running server instead")
    bench.add_argument("--out", type=Path, help="output directory (default results/bench-...)")
    bench.add_argument(
        "--max-failures",
        type=_int(0, 10**12),
        default=None,
        help="exit with 1 when more requests than this fail (default: no limit)",
    )
    bench.set_defaults(func=_bench)

    compare = commands.add_parser(
        "compare",
        help="the same scenario on asyncio and uvloop, alternating rounds",
        description="Run one scenario against an asyncio and a uvloop server in alternating "
        "rounds; write compare.json, compare.md and plots. --sweep draws the scaling curve.",
    )
    compare.add_argument("--scenario", choices=list(SCENARIOS), default="multiplex")
    compare.add_argument("--rounds", type=_int(1, 50), default=3, help="rounds (default 3)")
    _add_load_options(compare, users=1000, duration=30)
    compare.add_argument("--asyncio-url", type=_url, help="running asyncio server to use")
    compare.add_argument("--uvloop-url", type=_url, help="running uvloop server to use")
    compare.add_argument("--out", type=Path, help="output directory (default results/compare-...)")
    compare.add_argument(
        "--sweep",
        type=_levels,
        help="user counts, e.g. 100,1000,5000,10000,19000,100000: rounds at each, plus a "
        "scaling plot; a level one server process cannot hold runs on the fewest --workers "
        "that can (at least --workers)",
    )
    compare.set_defaults(func=_compare)

    matrix = commands.add_parser(
        "matrix",
        help="claims and asyncio-vs-uvloop per Python interpreter, in containers",
        description="For each interpreter x loop, in its own container built from the "
        "Dockerfile: `loop-lab claims`, saturated throughput with wrk (server and wrk on "
        "separate CPUs), and one multiplex load. Writes matrix.json, matrix.md and plots.",
    )
    matrix.add_argument(
        "--pythons",
        type=_pythons,
        default=("3.11", "3.13", "3.14", "3.15"),
        help="interpreters, comma-separated (default 3.11,3.13,3.14,3.15)",
    )
    matrix.add_argument("--rounds", type=_int(1, 20), default=3, help="rounds (default 3)")
    matrix.add_argument(
        "--quick", action="store_true", help="1 short round and 1,000 connections (for CI)"
    )
    matrix.add_argument(
        "--context", type=Path, default=Path("."), help="the checkout with the Dockerfile"
    )
    matrix.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="measure nothing: join the matrix.json of earlier runs (same settings) into --out",
    )
    matrix.add_argument(
        "--no-instructions",
        dest="instructions",
        action="store_false",
        help="skip the callgrind run per cell (instructions per request; off in --quick)",
    )
    matrix.add_argument(
        "--no-standins",
        dest="standins",
        action="store_false",
        help="never make stand-in base images from Debian packages; let docker pull the official "
        "python:X.Y images (the compose profile's way)",
    )
    matrix.add_argument("--out", type=Path, help="output directory (default results/matrix)")
    matrix.set_defaults(func=_matrix)
