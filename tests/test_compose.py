"""docker-compose.yml and the Dockerfile, proven without a Docker engine.

docker-compose validates the file; the Dockerfile's steps are executed into a stand-in image
directory (tests/deploy_support.py); then every compose service's own command line, read from
`docker-compose config`, runs from that image with hosts and ports swapped for loopback ones.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from app.bench.scenarios import SCENARIOS
from app.config import Settings
from app.server import FD_HEADROOM, TARGET_CONNECTIONS
from tests.deploy_support import (
    COMPOSE_FILE,
    REPO,
    Image,
    Instruction,
    Service,
    answers_ok,
    build_image,
    compose,
    compose_config,
    free_port,
    healthcheck_parts,
    http_get,
    http_json,
    localize,
    parse_dockerfile,
    stage_chain,
    wait_for,
)

SERVERS = {"server-asyncio": "asyncio", "server-uvloop": "uvloop"}
CORE_SERVICES = {*SERVERS, "locust-master", "locust-worker"}
PROFILES = {"compare": {"compare"}, "observability": {"prometheus", "grafana"}}
# compose's own knobs keep the one-shot compare short here: users, seconds and rounds
BOUNDED = {"COMPARE_ROUNDS": "1", "COMPARE_USERS": "4", "COMPARE_DURATION": "3"}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """Every service, all profiles on, as `docker-compose config` resolves them."""
    config = compose_config(*PROFILES, env=BOUNDED)
    found: dict[str, Any] = config["services"]
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Image]]:
    """The Dockerfile's `server` and `load` targets, built side by side (about 25 s); removed
    afterwards (~350 MB)."""
    root = tmp_path_factory.mktemp("images")
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {t: pool.submit(build_image, t, root / t) for t in ("server", "load")}
            built = {target: future.result() for target, future in futures.items()}
        yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Stack:
    """Compose services run locally from the stand-in images; `close()` stops every one."""

    def __init__(self, services: dict[str, Any], images: dict[str, Image], log_dir: Path) -> None:
        self.services = services
        self.images = images
        self.log_dir = log_dir
        self.started: list[Service] = []

    def image(self, name: str) -> Image:
        return self.images[self.services[name]["build"]["target"]]

    def run(
        self,
        name: str,
        swaps: dict[str, str],
        env: dict[str, str] | None = None,
        instance: str | None = None,
    ) -> Service:
        """Start the service's command (compose's, else the image's CMD), every swap applied."""
        spec, image = self.services[name], self.image(name)
        argv, used = localize(spec.get("command") or image.state.cmd, swaps)
        assert used == set(swaps), f"{name}: {sorted(set(swaps) - used)} not in {argv}"
        environment = image.environment({**spec.get("environment", {}), **(env or {})})
        service = Service(
            instance or name,
            [image.which(argv[0]), *argv[1:]],
            environment,
            image.workdir,
            self.log_dir,
        )
        self.started.append(service)
        return service

    def server(self, name: str) -> tuple[Service, str]:
        """A server service on a free loopback port, once its /healthz answers."""
        port = free_port()
        # --host 0.0.0.0 becomes loopback; the port comes in through env (the command has none)
        server = self.run(name, {"0.0.0.0": "127.0.0.1"}, env={"LOOP_LAB_PORT": str(port)})
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{name} /healthz", lambda: answers_ok(f"{url}/healthz"), 30, server)
        return server, url

    def close(self) -> None:
        for service in reversed(self.started):
            service.stop()


@pytest.fixture
def stack(services: dict[str, Any], images: dict[str, Image], tmp_path: Path) -> Iterator[Stack]:
    """Run compose services; each is stopped (by its process group id) when the test ends."""
    running = Stack(services, images, tmp_path)
    try:
        yield running
    finally:
        running.close()


# ---- docker-compose config ------------------------------------------------------------------


def test_compose_file_validates_with_and_without_profiles() -> None:
    """`docker-compose config` accepts the file alone, per profile and with every profile."""
    for profiles in ([], *([p] for p in PROFILES), list(PROFILES)):
        args = [arg for p in profiles for arg in ("--profile", p)]
        result = compose(*args, "config", "--quiet")
        assert result.returncode == 0, f"profiles {profiles}: {result.stderr}"
    listed = compose("config", "--profiles")
    assert set(listed.stdout.split()) == set(PROFILES)


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is real: a misspelt key and a non-number for `cpus` both fail."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("ulimits:", "ulimit:", 1))
    result = compose("config", "--quiet", file=broken)
    assert result.returncode != 0
    assert "ulimit" in result.stderr
    result = compose("config", "--quiet", env={"SERVER_CPUS": "plenty"})
    assert result.returncode != 0
    assert "cpus" in result.stderr


def test_plain_up_starts_servers_and_locust_and_profiles_hold_the_rest(
    services: dict[str, Any],
) -> None:
    """`docker compose up` runs both servers and locust; compare and observability wait for
    their profiles."""
    assert set(services) == CORE_SERVICES.union(*PROFILES.values())
    for name in CORE_SERVICES:
        assert "profiles" not in services[name], name
    for profile, names in PROFILES.items():
        for name in names:
            assert services[name]["profiles"] == [profile]


def test_the_two_servers_differ_only_in_loop_and_published_port(
    services: dict[str, Any],
) -> None:
    """Same image, CPUs, limits and healthcheck; only LOOP_LAB_LOOP and the host port differ."""
    specs = {name: services[name] for name in SERVERS}
    for name, loop in SERVERS.items():
        assert specs[name]["environment"] == {"LOOP_LAB_LOOP": loop}
        assert all(p.startswith("127.0.0.1:") for p in specs[name]["ports"]), "loopback only"

    def shared(spec: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in spec.items() if k not in ("environment", "ports")}

    asyncio_spec, uvloop_spec = specs.values()
    assert shared(asyncio_spec) == shared(uvloop_spec)
    assert asyncio_spec["build"]["target"] == "server"
    assert float(asyncio_spec["cpus"]) > 0
    backlog = Settings().backlog
    nofile = asyncio_spec["ulimits"]["nofile"]
    assert min(nofile["soft"], nofile["hard"]) >= TARGET_CONNECTIONS + backlog + FD_HEADROOM
    assert int(asyncio_spec["sysctls"]["net.core.somaxconn"]) >= backlog


def test_compose_healthcheck_is_the_dockerfile_healthcheck(services: dict[str, Any]) -> None:
    """compose and the image probe /healthz with the very same command."""
    server_stage = stage_chain(parse_dockerfile(), "server")[-1]
    (healthcheck,) = server_stage.all("HEALTHCHECK")
    _, command = healthcheck_parts(healthcheck.args)
    assert "/healthz" in " ".join(command)
    for name in SERVERS:
        assert services[name]["healthcheck"]["test"] == ["CMD", *command]


def test_locust_and_compare_use_the_load_image_and_existing_scenarios() -> None:
    """For every scenario, master, workers and compare name the same existing loadtest file."""
    for scenario in SCENARIOS:
        specs = compose_config("compare", env={"SCENARIO": scenario})["services"]
        locustfiles = set()
        for name in ("locust-master", "locust-worker"):
            command = specs[name]["command"]
            locustfiles.add(command[command.index("-f") + 1])
            assert specs[name]["build"]["target"] == "load"
        assert locustfiles == {f"loadtest/{scenario}.py"}
        assert (REPO / f"loadtest/{scenario}.py").is_file()
        assert f"--scenario={scenario}" in specs["compare"]["command"]


def test_workers_can_be_scaled(services: dict[str, Any]) -> None:
    """locust-worker has no fixed name or host port, so `--scale locust-worker=N` works."""
    worker = services["locust-worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "--worker" in worker["command"]


# ---- Dockerfile -----------------------------------------------------------------------------


def chain_instructions(target: str) -> list[Instruction]:
    return [ins for stage in stage_chain(parse_dockerfile(), target) for ins in stage.instructions]


def copied_from(target: str) -> str:
    """The build stage whose /opt/venv the runtime target copies."""
    for ins in chain_instructions(target):
        if ins.keyword == "COPY" and "--from=" in ins.args:
            return ins.args.split("--from=")[1].split()[0]
    raise AssertionError(f"{target} copies no venv from a build stage")


@pytest.mark.parametrize("target", ["server", "load"])
def test_dependencies_are_installed_in_a_layer_before_the_code(target: str) -> None:
    """pip installs the requirements before app/ is copied, then the project without deps."""
    steps = chain_instructions(copied_from(target))
    text = [f"{ins.keyword} {ins.args}" for ins in steps]
    deps = next(i for i, t in enumerate(text) if t.startswith("RUN") and "pip install -r" in t)
    pyproject = next(i for i, t in enumerate(text) if t.startswith("COPY") and "pyproject" in t)
    code = next(i for i, t in enumerate(text) if t.startswith("COPY") and " app " in f"{t} ")
    project = next(i for i, t in enumerate(text) if "pip install --no-deps ." in t)
    assert pyproject < deps < code < project
    assert len(parse_dockerfile()) >= 4, "multi-stage: build stages apart from runtime stages"


@pytest.mark.parametrize("target", ["server", "load"])
def test_runtime_images_run_as_a_created_non_root_user(target: str) -> None:
    """The final USER is not root, and a RUN useradd in the same image creates it."""
    steps = chain_instructions(target)
    users = [ins.args for ins in steps if ins.keyword == "USER"]
    assert users, f"{target} never sets USER"
    assert users[-1] not in {"root", "0"}
    created = [shlex.split(i.args) for i in steps if i.keyword == "RUN" and "useradd" in i.args]
    assert any(words[-1] == users[-1] for words in created)


def test_server_image_starts_serve_on_all_interfaces_with_a_healthcheck() -> None:
    """CMD is `loop-lab serve --host 0.0.0.0`; the HEALTHCHECK is a python one-liner on /healthz."""
    server = stage_chain(parse_dockerfile(), "server")[-1]
    assert parse_dockerfile()[-1].name == "server", "a plain `docker build .` gives the server"
    (cmd,) = server.all("CMD")
    assert json.loads(cmd.args) == ["loop-lab", "serve", "--host", "0.0.0.0"]
    (healthcheck,) = server.all("HEALTHCHECK")
    options, command = healthcheck_parts(healthcheck.args)
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2]
    assert {"interval", "timeout", "retries"} <= set(options)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching .dockerignore line decides (`!` re-includes)."""
    verdict = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        names = parts if pattern.lstrip("!").startswith("**/") else []
        if any(fnmatch.fnmatchcase(p, glob) for p in prefixes + names):
            verdict = not negate
    return verdict


def test_dockerignore_sends_what_copy_needs_and_nothing_heavy() -> None:
    """Every file a COPY takes reaches the build context; .venv, .git, tests and results do not."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = {
        word
        for stage in parse_dockerfile()
        for ins in stage.all("COPY")
        if "--from=" not in ins.args
        for word in shlex.split(ins.args)[:-1]
    }
    for source in sources:
        root = REPO / source
        files = [root] if root.is_file() else [p for p in root.rglob("*.py")]
        assert files, source
        for file in files:
            assert not _ignored(str(file.relative_to(REPO)), patterns), file
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_compose.py",
        "results/x.json",
        "app/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(heavy, patterns), heavy


@pytest.mark.slow
def test_every_dockerfile_step_was_exercised(images: dict[str, Image]) -> None:
    """Building both stand-in images ran every instruction of their chains; only useradd,
    which would change this machine, is left to the structure checks above."""
    for target, image in images.items():
        expected = {
            ins for stage in (target, copied_from(target)) for ins in chain_instructions(stage)
        }
        done = set(image.executed) | set(image.system_steps)
        assert done == expected, f"{target}: not run: {sorted(map(str, expected - done))}"
        assert all(ins.args.startswith("useradd") for ins in image.system_steps)


@pytest.mark.slow
def test_server_image_holds_runtime_dependencies_only(images: dict[str, Image]) -> None:
    """The server venv has aiohttp, uvloop and prometheus_client, and no test or load tools."""
    python = images["server"].which("python")
    listing = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, json; "
            "print(json.dumps([d.metadata['Name'].lower() for d in m.distributions()]))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=images["server"].environment(),
    )
    installed = {name.replace("_", "-") for name in json.loads(listing.stdout)}
    assert {"loop-lab", "aiohttp", "uvloop", "prometheus-client"} <= installed
    assert not installed & {"pytest", "locust", "matplotlib", "ruff", "mypy", "hypothesis"}


# ---- each compose service's command, run locally --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SERVERS))
def test_server_service_serves_its_loop_and_healthcheck_tracks_it(name: str, stack: Stack) -> None:
    """The image's CMD with the service's env serves on the named loop; the healthcheck
    passes while it runs and fails once it is gone."""
    server, url = stack.server(name)
    stats = http_json(f"{url}/stats")
    assert stats["loop"] == SERVERS[name]
    assert stats["pid"] == server.proc.pid

    image, spec = stack.image(name), stack.services[name]
    _cmd, program, *args = spec["healthcheck"]["test"]
    env = image.environment({**spec["environment"], "LOOP_LAB_PORT": url.rsplit(":", 1)[1]})

    def healthcheck() -> int:
        argv = [image.which(program), *args]
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert healthcheck() == 0
    server.stop()
    assert server.returncode == 0, server.log_tail()
    assert healthcheck() != 0


@pytest.mark.slow
def test_locust_master_and_scaled_workers_run_distributed_load(stack: Stack) -> None:
    """locust-master (web UI) and two locust-worker copies connect, split the users and send
    requests that the server counts; the run stops by itself."""
    _server, url = stack.server("server-asyncio")
    master_port, web_port = free_port(), free_port()
    master = stack.run(
        "locust-master",
        {
            "0.0.0.0": "127.0.0.1",
            "5557": str(master_port),
            "8089": str(web_port),
            "http://server-asyncio:8080": url,
        },
    )
    web = f"http://127.0.0.1:{web_port}"
    wait_for("locust web UI", lambda: answers_ok(f"{web}/"), 60, master)
    workers = [  # what `--scale locust-worker=2` starts
        stack.run(
            "locust-worker",
            {"locust-master": "127.0.0.1", "5557": str(master_port)},
            instance=f"locust-worker-{i}",
        )
        for i in (1, 2)
    ]

    def both_workers() -> int | None:
        count = http_json(f"{web}/stats/requests").get("worker_count", 0)
        return count if count == len(workers) else None

    wait_for("2 workers to connect", both_workers, 60, master, *workers)
    answer = http_json(f"{web}/swarm", {"user_count": "4", "spawn_rate": "4", "run_time": "20s"})
    assert answer["success"], answer
    assert answer["host"] == url, "the UI's host field comes from compose's --host"

    def running_everywhere() -> dict[str, Any] | None:
        report: dict[str, Any] = http_json(f"{web}/stats/requests")
        spread = all(w["user_count"] > 0 for w in report["workers"])
        return report if spread and report["stats"][-1]["num_requests"] >= 10 else None

    report = wait_for("requests from both workers", running_everywhere, 30, master, *workers)
    assert report["stats"][-1]["num_failures"] == 0, report["errors"]
    http_get(f"{web}/stop")
    routes = http_json(f"{url}/stats")["routes"]
    assert routes["/await"]["count"] > 0
    assert routes["/healthz"]["count"] > 0


@pytest.mark.slow
def test_compare_service_writes_its_report_to_the_results_mount(stack: Stack) -> None:
    """The one-shot compare runs against both servers and writes compare.json and compare.md
    where compose mounts ./results."""
    urls = {name: stack.server(name)[1] for name in SERVERS}
    (mount,) = stack.services["compare"]["volumes"]
    source, target = mount.split(":")[:2]
    assert Path(source) == REPO / "results"
    out = stack.log_dir / "results"
    compare = stack.run(
        "compare",
        {
            "http://server-asyncio:8080": urls["server-asyncio"],
            "http://server-uvloop:8080": urls["server-uvloop"],
            target: str(out),
        },
    )
    assert compare.wait(timeout=150) == 0, compare.log_tail()
    report = json.loads((out / "compare.json").read_text())
    assert report["scenario"] == "multiplex"
    assert set(report["summary"]) == {"asyncio", "uvloop"}
    assert {r["loop"] for r in report["rounds"]} == {"asyncio", "uvloop"}
    assert (out / "compare.md").read_text().strip()
