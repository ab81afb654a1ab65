"""Helpers for the deploy files' tests; the images themselves run in `make compose-test`.

- `compose_config()` is `docker-compose config`: the compose file as Docker would see it.
- `parse_dockerfile()` reads the Dockerfile's stages and instructions, for structure checks.
- `Service` runs a command as a subprocess in its own process group and stops it by that id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
# Interpolation variables docker-compose.yml reads; cleared so the caller's shell cannot leak in.
COMPOSE_KNOBS = (
    "SCENARIO",
    "TARGET",
    "SERVER_CPUS",
    "COMPARE_ROUNDS",
    "COMPARE_USERS",
    "COMPARE_DURATION",
    "HOST_UID",
    "HOST_GID",
    "RESULTS_DIR",
    "NOFILE",
)
T = TypeVar("T")


def require_program(name: str) -> str:
    """The program's path; a clear failure (not a skip) when `make system-deps` was not run."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (installs Debian packages)")
    return path


def wait_for(
    what: str | Callable[[], str], check: Callable[[], T | None], timeout: float, *watch: Service
) -> T:
    """Poll `check` until it returns something other than None; fail early if a watched
    process died (showing its log), or when the timeout runs out. `what` may be a callable,
    to describe at failure time what is still missing."""
    deadline = time.monotonic() + timeout
    while True:
        for service in watch:
            if service.exited():
                pytest.fail(
                    f"{service.name} exited ({service.returncode}) while waiting for "
                    f"{what if isinstance(what, str) else what()}:\n{service.log_tail()}"
                )
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name}:\n{s.log_tail()}" for s in watch)
            described = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {described}\n{logs}")
        time.sleep(0.1)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """(status, body), or None when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:  # an unclosed error response is a ResourceWarning on 3.14+
            return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def answers_ok(url: str) -> bool | None:
    """True once `url` answers 200; None (keep waiting) before that."""
    answer = http_get(url, timeout=2)
    return True if answer is not None and answer[0] == 200 else None


def http_json(url: str, data: Mapping[str, str] | None = None, timeout: float = 5.0) -> Any:
    body = None if data is None else urllib.parse.urlencode(data).encode()
    with urllib.request.urlopen(url, data=body, timeout=timeout) as response:
        return json.loads(response.read())


# ---- docker-compose -------------------------------------------------------------------------


def compose(
    *args: str, env: Mapping[str, str] | None = None, file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    """Run Debian's docker-compose (v1) on a compose file (the project's by default), from the
    project directory; `config` never needs an engine."""
    program = require_program("docker-compose")
    clean_env = {k: v for k, v in os.environ.items() if k not in COMPOSE_KNOBS}
    return subprocess.run(
        [program, "--project-directory", str(REPO), "-f", str(file), *args],
        cwd=REPO,
        env={**clean_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def compose_config(*profiles: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The validated, interpolated compose file, as `docker-compose config` prints it."""
    result = compose(*(arg for p in profiles for arg in ("--profile", p)), "config", env=env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


# ---- Dockerfile -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def __str__(self) -> str:
        return f"line {self.line}: {self.keyword} {self.args}"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.strip().startswith("#") or (not raw.strip() and not pending):
            continue
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1].strip())
            continue
        line = " ".join([*pending, raw.strip()])
        pending = []
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            stages.append(Stage(name, base))
        else:
            stages[-1].instructions.append(Instruction(keyword, args, start))
    return stages


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK's JSON form (the only form these files use)."""
    assert args.startswith("["), f"expected the exec (JSON) form, got {args!r}"
    argv: list[str] = json.loads(args)
    return argv


def healthcheck_parts(args: str) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options (--interval=...) and its command."""
    match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(.*)", args, re.DOTALL)
    assert match, f"unexpected HEALTHCHECK form: {args!r}"
    options = dict(o[2:].split("=", 1) for o in match[1].split())
    return options, exec_form(match[2])


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The target stage and the stages it builds FROM, root first."""
    by_name = {s.name: s for s in stages}
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


# ---- processes ------------------------------------------------------------------------------


class Service:
    """One command running like a compose service: own process group, log file, stop by id."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL, to this service's own process group (its id is its pid)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # children the service left behind (e.g. compare's locust) are in its group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
