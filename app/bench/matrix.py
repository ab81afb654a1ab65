"""`loop-lab matrix`: each interpreter x loop in its own container, measured side by side.

Per interpreter one image from the project's Dockerfile (PYTHON_IMAGE/BUILD_IMAGE); per cell the
claims, saturated throughput (server pinned to one CPU in its container, wrk on the other, fresh
server per round, loops alternating) and one multiplex load from locust beside them.
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bench.compare import run_order
from app.bench.instructions import SERVE_ARGS, MeterError, dump_count, per_request_counts
from app.bench.results import machine, median, source_version, spread, write_json
from app.bench.runner import TreeCpu
from app.bench.wrk import run_wrk
from app.launch import eventually
from app.loops import LOOP_NAMES, LoopName

PYTHONS = ("3.11", "3.13", "3.14", "3.15")
# where the loop, not the load generator, is the limit
SATURATED_PATHS = ("/healthz", "/await?delay=0", "/gather?n=100&delay=0")
# the Debian suite of the official python:X.Y-slim-SUITE image each interpreter is taken from
SUITES = {"3.11": "bookworm", "3.12": "bookworm", "3.13": "trixie", "3.14": "trixie"}
SERVER_CPU, GENERATOR_CPU = 0, 1
START_TIMEOUT_S = 60.0
# a server below this share of its CPU, or wrk above it, means wrk set the pace
BUSY_SHARE = 0.9
# callgrind's batches per path (N1, N2 requests), each difference ~300M instructions: a few
# minutes per cell at valgrind's ~50x slowdown
INSTRUCTION_BATCHES = {
    "/healthz": (500, 2500),
    "/await?delay=0": (500, 2500),
    "/gather?n=100&delay=0": (20, 80),
}
VALGRIND_START_TIMEOUT_S = 300.0  # imports and the process pool's spawn, 50x slower

Log = Callable[[str], None]


class MatrixError(RuntimeError):
    """A cell could not be measured: image build, container start or a load run failed."""


@dataclass(frozen=True)
class MatrixConfig:
    out: Path
    pythons: tuple[str, ...] = PYTHONS
    rounds: int = 3
    duration_s: float = 10.0  # each wrk run
    warmup_s: float = 2.0
    connections: int = 50
    users: int = 10_000  # multiplex load per cell
    multiplex_delay_s: float = 10.0
    multiplex_duration_s: int = 60
    port: int = 18_090
    context: Path = Path(".")  # the checkout holding the Dockerfile
    # make absent base images from Debian packages; off, `docker build` pulls the official ones
    standins: bool = True
    instructions: bool = True  # callgrind's instructions per request per cell
    command: tuple[str, ...] = ()

    @classmethod
    def quick(cls, out: Path, pythons: tuple[str, ...], **kw: Any) -> MatrixConfig:
        """1 round of short wrk runs and 1,000 connections: minutes, for CI."""
        return cls(
            out=out,
            pythons=pythons,
            rounds=1,
            duration_s=3.0,
            warmup_s=1.0,
            users=1000,
            multiplex_delay_s=5.0,
            multiplex_duration_s=20,
            instructions=False,
            **kw,
        )


def base_images(python: str) -> tuple[str, str]:
    """The official (runtime, build) image names of an interpreter, as the Dockerfile takes them."""
    suite = SUITES.get(python, "trixie")
    return f"python:{python}-slim-{suite}", f"python:{python}-{suite}"


def image_name(python: str) -> str:
    return f"loop-lab:server-py{python}"


def _docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise MatrixError(f"docker {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def _image_exists(name: str) -> bool:
    done = subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False)
    return done.returncode == 0


def ensure_bases(python: str, context: Path) -> None:
    """Make the interpreter's base images from Debian packages where the engine has none.

    No registry here: the stand-in builder (scripts/standin_images.py, root and debootstrap)
    makes them and says so. Debian ships 3.11 in bookworm, 3.13 in trixie, the newer ones in sid.
    """
    missing = [n for n in base_images(python) if not _image_exists(n)]
    if not missing:
        return
    suite = {"3.11": "bookworm", "3.13": "trixie"}.get(python, "sid")
    standins = context / "scripts" / "standin_images.py"
    if not standins.exists():  # not a checkout: `docker build` pulls what it can
        return
    argv = [sys.executable, str(standins), "--suite", suite, "--python", python, *missing]
    if subprocess.run(argv, check=False).returncode != 0:
        raise MatrixError(f"could not make base images {missing} for Python {python}")


def ensure_image(python: str, config: MatrixConfig, log: Log) -> str:
    """Build the server image for `python` from the Dockerfile (stand-in bases if allowed)."""
    runtime, build = base_images(python)
    if config.standins:
        ensure_bases(python, config.context)
    name = image_name(python)
    log(f"matrix: building {name} from {runtime}")
    started = time.monotonic()
    _docker(
        "build",
        "--network",
        "host",
        "--target",
        "server",
        "--build-arg",
        f"PYTHON_IMAGE={runtime}",
        "--build-arg",
        f"BUILD_IMAGE={build}",
        "-t",
        name,
        str(config.context),
    )
    log(f"matrix: {name} built in {time.monotonic() - started:.0f} s")
    return name


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:  # refused while it starts, or not yet answering
        return False


@contextmanager
def server_container(
    image: str,
    loop: LoopName,
    port: int,
    name: str,
    cpu: int | None = SERVER_CPU,
    wrapper: Sequence[str] = (),
    serve_args: Sequence[str] = (),
    within: float = START_TIMEOUT_S,
) -> Iterator[tuple[str, TreeCpu]]:
    """A fresh `loop-lab serve` in a container on the host network; yields its URL and CPU meter.

    `wrapper` goes before the command (valgrind), `serve_args` after it.
    """
    argv = ["run", "-d", "--rm", "--network", "host", "--name", name]
    if cpu is not None:
        argv += ["--cpuset-cpus", str(cpu)]
    argv += [image, *wrapper, "loop-lab", "serve", "--loop", loop, "--host", "127.0.0.1"]
    argv += ["--port", str(port), *serve_args]
    _docker("rm", "-f", name, check=False)
    _docker(*argv)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(eventually(lambda: _healthy(url), within=within, what=url))
        except TimeoutError as exc:
            logs = _docker("logs", "--tail", "30", name, check=False)
            raise MatrixError(f"{image} ({loop}) did not become healthy: {exc}\n{logs}") from exc
        pid = int(_docker("inspect", "-f", "{{.State.Pid}}", name))
        yield url, TreeCpu(pid)
    finally:
        _docker("rm", "-f", name, check=False)


_VALGRIND = """FROM {image}
USER root
RUN apt-get update \\
    && apt-get install -y --no-install-recommends valgrind perl \\
    && rm -rf /var/lib/apt/lists/*
USER looplab
"""


def valgrind_image(image: str, log: Log) -> str:
    """The server image plus valgrind (callgrind_control is a perl script)."""
    name = image.replace(":server-", ":valgrind-")
    log(f"matrix: building {name}")
    done = subprocess.run(
        ["docker", "build", "--network", "host", "-t", name, "-"],
        input=_VALGRIND.format(image=image),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise MatrixError(f"could not build {name}: {done.stderr.strip()[-2000:]}")
    return name


def instructions_in(image: str, loop: LoopName, config: MatrixConfig) -> tuple[dict[str, int], int]:
    """Instructions per request of each saturated path, the server under callgrind, without the
    clock's share (app.bench.instructions.PerRequest); and the idle server's per second.

    Served with app.bench.instructions.SERVE_ARGS, as scripts/instructions.py runs it.
    """
    name = f"looplab-matrix-callgrind-{loop}"
    out = "/tmp/callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    valgrind += ["--log-file=/tmp/valgrind.log"]
    under_callgrind = server_container(
        image,
        loop,
        config.port + 2,
        name,
        wrapper=valgrind,
        serve_args=SERVE_ARGS,
        within=VALGRIND_START_TIMEOUT_S,
    )
    with under_callgrind as (url, _):
        dumps = 0

        async def dump() -> int:
            nonlocal dumps
            dumps += 1  # with no pid, callgrind_control dumps every callgrind run: the server
            await asyncio.to_thread(_docker, "exec", name, "callgrind_control", "--dump")
            grep = ("exec", name, "grep", "-m1", "^summary:", f"{out}.{dumps}")
            return dump_count(await asyncio.to_thread(_docker, *grep))

        try:
            clock_per_s, figures = asyncio.run(
                per_request_counts(url, INSTRUCTION_BATCHES, config.connections, dump)
            )
        except MeterError as exc:
            raise MatrixError(f"callgrind in {image} ({loop}): {exc}") from exc
    return {path: round(n.unclocked) for path, n in figures.items()}, round(clock_per_s)


_VERSIONS = (
    "import platform, importlib.metadata as m; "
    "print(platform.python_version(), m.version('aiohttp'), m.version('uvloop'))"
)


def versions_in(image: str) -> dict[str, str]:
    """The interpreter, aiohttp and uvloop versions inside the image."""
    python, aiohttp, uvloop = _docker(
        "run", "--rm", "--network", "host", image, "python", "-c", _VERSIONS
    ).split()
    return {"python": python, "aiohttp": aiohttp, "uvloop": uvloop}


def claims_in(image: str, loop: LoopName) -> list[dict[str, str]]:
    """`loop-lab claims --json --loop L` inside the image: the verdicts of this interpreter."""
    argv = ["docker", "run", "--rm", "--network", "host", image]
    argv += ["loop-lab", "claims", "--json", "--loop", loop]
    # exit 1 still prints every result: an experiment that failed is reported as "error"
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        items: list[dict[str, str]] = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise MatrixError(f"claims in {image} ({loop}) failed: {done.stderr[-2000:]}") from None
    return [{k: item[k] for k in ("id", "verdict", "evidence")} for item in items]


@dataclass
class Saturated:
    """One cell's saturated runs on one path: a figure per round."""

    rps: list[float] = field(default_factory=list)
    cpu_us_per_request: list[float] = field(default_factory=list)
    server_cpu_share: list[float] = field(default_factory=list)
    generator_cpu_share: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        server_share = min(self.server_cpu_share, default=0.0)
        generator_share = max(self.generator_cpu_share, default=0.0)
        return {
            "rps": round(median(self.rps), 1),
            "cpu_us_per_request": round(median(self.cpu_us_per_request), 2),
            "rounds": [round(r, 1) for r in self.rps],
            "server_cpu_share": round(server_share, 3),
            "generator_cpu_share": round(generator_share, 3),
            "errors": self.errors,
            # saturated means the server's CPU was the limit, not wrk's
            "server_bound": server_share >= BUSY_SHARE and generator_share < BUSY_SHARE,
        }


def saturate(url: str, meter: TreeCpu, path: str, config: MatrixConfig, into: Saturated) -> None:
    run_wrk(url + path, duration_s=config.warmup_s, connections=config.connections)
    meter.sample()
    before, started = meter.total_s, time.monotonic()
    result = run_wrk(
        url + path, duration_s=config.duration_s, connections=config.connections, cpu=GENERATOR_CPU
    )
    wall = time.monotonic() - started
    meter.sample()
    cpu = meter.total_s - before
    into.rps.append(result.rps)
    into.cpu_us_per_request.append(1e6 * cpu / max(result.requests, 1))
    into.server_cpu_share.append(cpu / wall)
    into.generator_cpu_share.append(result.cpu_s / wall)
    into.errors += result.socket_errors + result.non_2xx


def multiplex(image: str, loop: LoopName, config: MatrixConfig, out: Path) -> dict[str, Any]:
    """One `loop-lab bench multiplex` from the host against a fresh server in the container."""
    name = f"looplab-matrix-{loop}"
    with server_container(image, loop, config.port + 1, name, cpu=None) as (url, meter):
        meter.sample()
        before = meter.total_s
        argv = [sys.executable, "-m", "app", "bench", "multiplex", "--target", url]
        argv += ["--users", str(config.users), "--delay", f"{config.multiplex_delay_s:g}"]
        argv += ["--duration", str(config.multiplex_duration_s), "--out", str(out)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        meter.sample()
        cpu = meter.total_s - before
    result_file = out / "result.json"
    if not result_file.exists():
        raise MatrixError(f"bench multiplex wrote no result ({done.returncode}): {done.stderr}")
    result = json.loads(result_file.read_text())
    server = result["server"]
    block = {
        "users": result["users"],
        "requests": result["requests"],
        "failures": result["failures"],
        "rps": result["rps"],
        "p99_ms": result["latency_ms"]["p99"],
        "lag_p99_ms": server["lag_ms"]["p99"],
        "lag_max_ms": server["lag_ms"]["max"],
        "peak_open_connections": server.get("peak_open_connections"),
        "rss_kb_per_connection": server.get("rss_kb_per_connection"),
        "cpu_us_per_request": round(1e6 * cpu / max(result["requests"], 1), 1),
        "load_generator_cpu_warning": result["load_generator"]["cpu_warning"],
    }
    if "utilization" in server:
        block["utilization"] = server["utilization"]
    return block


def run_matrix(config: MatrixConfig, log: Log = print) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple[str, LoopName], dict[str, Any]] = {}
    ratio: dict[str, dict[str, dict[str, float]]] = {}
    for python in config.pythons:
        image = ensure_image(python, config, log)
        versions = versions_in(image)
        full = versions["python"]
        saturated: dict[LoopName, dict[str, Saturated]] = {
            loop: {path: Saturated() for path in SATURATED_PATHS} for loop in LOOP_NAMES
        }
        for number in range(1, config.rounds + 1):
            for loop in run_order(number):
                log(f"matrix: Python {full} {loop}, round {number}/{config.rounds}")
                name = f"looplab-matrix-{loop}"
                with server_container(image, loop, config.port, name) as (url, meter):
                    for path in SATURATED_PATHS:
                        saturate(url, meter, path, config, saturated[loop][path])
        ratio[python] = {}
        for path in SATURATED_PATHS:
            pairs = [
                uv / aio
                for aio, uv in zip(
                    saturated["asyncio"][path].rps, saturated["uvloop"][path].rps, strict=True
                )
            ]
            ratio[python][path] = {
                "median": round(median(pairs), 3),
                "min": round(min(pairs), 3),
                "max": round(max(pairs), 3),
                "spread": round(spread(pairs), 3),
            }
        for loop in LOOP_NAMES:
            log(f"matrix: Python {full} {loop}: claims, then {config.users:,} connections")
            out = config.out / f"py{python}-{loop}"
            cells[(python, loop)] = {
                "python": python,
                "python_full": full,
                "versions": versions,
                "loop": loop,
                "claims": claims_in(image, loop),
                "saturated": {p: s.summary() for p, s in saturated[loop].items()},
                "multiplex": multiplex(image, loop, config, out / "multiplex"),
            }
        if config.instructions:
            measured = valgrind_image(image, log)
            for loop in LOOP_NAMES:
                log(f"matrix: Python {full} {loop}: instructions per request under callgrind")
                counts, idle = instructions_in(measured, loop, config)
                cells[(python, loop)] |= {"instructions": counts, "idle_instructions_per_s": idle}
        write_json(config.out / "matrix.json", _data(config, list(cells.values()), ratio))
    data = _data(config, list(cells.values()), ratio)
    write_json(config.out / "matrix.json", data)
    return data


def instruction_ratio(cells: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """uvloop / asyncio instructions per request, per interpreter and path (one run each)."""
    by_cell = {(c["python"], c["loop"]): c.get("instructions") for c in cells}
    found: dict[str, dict[str, float]] = {}
    for (python, loop), figures in by_cell.items():
        other = by_cell.get((python, "asyncio"))
        if loop == "uvloop" and figures and other:
            found[python] = {path: round(n / other[path], 3) for path, n in figures.items()}
    return found


def _data(
    config: MatrixConfig, cells: Sequence[dict[str, Any]], ratio: dict[str, Any]
) -> dict[str, Any]:
    return {
        "pythons": list(config.pythons),
        "rounds": config.rounds,
        "wrk": {"duration_s": config.duration_s, "connections": config.connections},
        "multiplex": {
            "users": config.users,
            "delay_s": config.multiplex_delay_s,
            "duration_s": config.multiplex_duration_s,
        },
        "cells": list(cells),
        "ratio": ratio,
        "instruction_ratio": instruction_ratio(cells),
        "command": list(config.command),
        "source": source_version(),
        "machine": {**machine(), "host_python": platform.python_version()},
    }


def combine(parts: Sequence[dict[str, Any]], command: Sequence[str]) -> dict[str, Any]:
    """One matrix from runs of the same settings (one interpreter at a time, say), side by side.

    Each run's cells were measured against each other only; across runs compare the claims and
    the instruction counts (which other load cannot move), not requests/s.
    """
    first = parts[0]
    settings = ("rounds", "wrk", "multiplex")
    for part in parts[1:]:
        if differ := [k for k in settings if part[k] != first[k]]:
            raise MatrixError(f"runs with other settings ({', '.join(differ)}) cannot be combined")
    cells = [cell for part in parts for cell in part["cells"]]
    return {
        **{k: first[k] for k in settings},
        "pythons": list(dict.fromkeys(p for part in parts for p in part["pythons"])),
        "cells": cells,
        "ratio": {k: v for part in parts for k, v in part["ratio"].items()},
        "instruction_ratio": instruction_ratio(cells),
        "command": list(command),
        "runs": [{"command": part["command"], "source": part["source"]} for part in parts],
        "source": first["source"],
        "machine": first["machine"],
    }
