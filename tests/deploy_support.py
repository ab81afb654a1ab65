"""Run what Docker would run, without a Docker engine.

- `compose_config()` is `docker-compose config`: the compose file as Docker would see it.
- `build_image()` executes the Dockerfile's instructions for one target into a directory that
  stands in for the image's filesystem (container paths such as /opt/venv are mapped under it),
  with this machine's Python standing in for the base image's.
- `localize()` swaps a compose service's hosts and ports for loopback ones in its command line.
- `Service` runs a command as a subprocess in its own process group and stops it by that id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
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
)
T = TypeVar("T")


def require_program(name: str) -> str:
    """The program's path; a clear failure (not a skip) when `make system-deps` was not run."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (installs Debian packages)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


# RUN steps that administer the system rather than build the app: checked by tests, never run.
SYSTEM_COMMANDS = frozenset({"useradd", "groupadd", "adduser", "apt-get", "apt"})


@dataclass
class ImageState:
    env: dict[str, str]
    workdir: str = "/"
    user: str = "root"
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] | None = None
    exposed: list[str] = field(default_factory=list)


@dataclass
class Image:
    """A Dockerfile target built into `root`; `path()` maps container paths under it."""

    target: str
    root: Path
    state: ImageState
    executed: list[Instruction]
    system_steps: list[Instruction]

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def workdir(self) -> Path:
        return self.path(self.state.workdir)

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**self.state.env, **(extra or {})}

    def which(self, program: str) -> str:
        found = shutil.which(program, path=self.state.env["PATH"])
        assert found, f"{program} not on the image's PATH {self.state.env['PATH']}"
        return found


class ImageBuilder:
    """Executes Dockerfile instructions; the base image is this machine's Python (same minor)."""

    def __init__(self, stages: list[Stage], root: Path) -> None:
        self.stages = {s.name: s for s in stages}
        self.root = root
        self.built: dict[str, ImageState] = {}
        self.executed: list[Instruction] = []
        self.system_steps: list[Instruction] = []
        self.mapped = self._container_paths(stages)

    @staticmethod
    def _container_paths(stages: list[Stage]) -> list[str]:
        """Absolute paths the Dockerfile creates or points at: they live under the fake root."""
        paths = {"/usr/local/bin"}
        for stage in stages:
            for ins in stage.instructions:
                if ins.keyword == "WORKDIR":
                    paths.add(ins.args)
                elif ins.keyword == "COPY" and "--from=" in ins.args:
                    paths.update(w for w in shlex.split(ins.args) if w.startswith("/"))
                elif ins.keyword == "ENV":
                    for pair in shlex.split(ins.args):
                        value = pair.partition("=")[2]
                        if value.startswith("/") and ":" not in value and "$" not in value:
                            paths.add(value)
        return sorted(paths, key=len, reverse=True)

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """Point container paths in a command or ENV value at the fake root."""
        for prefix in self.mapped:
            pattern = rf"(?<![\w/.-]){re.escape(prefix)}(?=$|[/\s:;\"'])"
            # escaped so re.sub takes the path literally
            text = re.sub(pattern, str(self.host(prefix)).replace("\\", "\\\\"), text)
        return text

    def base_image(self, name: str) -> ImageState:
        match = re.fullmatch(r"python:(\d+)\.(\d+)[-.\w]*", name)
        assert match, f"base image {name!r}: only python:X.Y images can be stood in for"
        wanted = (int(match[1]), int(match[2]))
        assert sys.version_info[:2] == wanted, (
            f"{name} needs Python {wanted}, tests run {sys.version}"
        )
        bin_dir = self.host("/usr/local/bin")
        bin_dir.mkdir(parents=True, exist_ok=True)
        python = Path(sys.base_prefix) / "bin" / f"python{wanted[0]}.{wanted[1]}"
        for alias in ("python", "python3", f"python{wanted[0]}.{wanted[1]}"):
            if not (bin_dir / alias).exists():
                (bin_dir / alias).symlink_to(python)
        # the machine's pip and TLS settings stay (pip needs them); nothing that steers the app
        inherited = {
            k: v
            for k, v in os.environ.items()
            if k not in {"PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", *COMPOSE_KNOBS}
            and not k.startswith(("LOOP_LAB_", "LOCUST_"))
        }
        return ImageState(env={**inherited, "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"})

    def build(self, name: str) -> ImageState:
        if name in self.built:
            return self.built[name]
        stage = self.stages[name]
        if stage.base in self.stages:
            parent = self.build(stage.base)
            state = replace(parent, env=dict(parent.env), cmd=list(parent.cmd))
        else:
            state = self.base_image(stage.base)
        for ins in stage.instructions:
            self.apply(state, ins)
        self.built[name] = state
        return state

    def apply(self, state: ImageState, ins: Instruction) -> None:
        if ins.keyword == "WORKDIR":
            state.workdir = ins.args
            self.host(ins.args).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, _, value = pair.partition("=")
                value = re.sub(r"\$\{?(\w+)\}?", lambda m: state.env.get(m[1], ""), value)
                state.env[key] = self.rewrite(value)
        elif ins.keyword == "COPY":
            self.copy(state, ins)
        elif ins.keyword == "RUN":
            if shlex.split(ins.args)[0] in SYSTEM_COMMANDS:
                self.system_steps.append(ins)
                return
            result = subprocess.run(
                ["sh", "-c", self.rewrite(ins.args)],
                cwd=self.host(state.workdir),
                env=state.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"{ins} failed:\n{result.stdout}\n{result.stderr}"
        elif ins.keyword == "USER":
            state.user = ins.args
        elif ins.keyword == "CMD":
            state.cmd = exec_form(ins.args)
        elif ins.keyword == "HEALTHCHECK":
            state.healthcheck = healthcheck_parts(ins.args)[1]
        elif ins.keyword == "EXPOSE":
            state.exposed.extend(ins.args.split())
        else:
            raise NotImplementedError(f"{ins}: teach tests/deploy_support.py this instruction")
        self.executed.append(ins)

    def copy(self, state: ImageState, ins: Instruction) -> None:
        words = shlex.split(ins.args)
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
        *sources, dest = [w for w in words if not w.startswith("--")]
        dest_path = self.host(dest if dest.startswith("/") else f"{state.workdir}/{dest}")
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            if "from" in flags:
                self.build(flags["from"])  # same fake root: identical paths need no copy
                origin = self.host(source)
            else:
                origin = REPO / source
            target = dest_path / origin.name if into_dir else dest_path
            if origin == target:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(
                    origin, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
                )
            else:
                shutil.copy2(origin, target)


def build_image(target: str, root: Path) -> Image:
    builder = ImageBuilder(parse_dockerfile(), root)
    state = builder.build(target)
    return Image(target, root, state, builder.executed, builder.system_steps)


# ---- running compose services locally -------------------------------------------------------


def localize(argv: Iterable[str], swaps: Mapping[str, str]) -> tuple[list[str], set[str]]:
    """Replace whole values (`--flag=VALUE` or a bare `VALUE`) found in `swaps`; return the new
    argv and the swap keys used, so a caller can insist that every host and port was swapped."""
    result: list[str] = []
    used: set[str] = set()
    for arg in argv:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if value in swaps:
            used.add(value)
            value = swaps[value]
        result.append(f"{flag}{eq}{value}")
    return result, used


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
