"""docker-compose.yml and the Dockerfile, checked without an engine; `make compose-test` runs them.

docker-compose validates the file (and the host-network variant compose-test runs, which may
differ from it only as docs/compose.md lists); what only the bridge form does, service names
resolving to the servers, is checked on `docker-compose config` here. The images are built and
started on a real Docker engine by `make compose-test` (scripts/compose_test.py).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.bench.scenarios import SCENARIOS
from app.config import Settings
from app.server import FD_HEADROOM, TARGET_CONNECTIONS
from scripts import compose_test
from tests.deploy_support import (
    COMPOSE_FILE,
    REPO,
    Instruction,
    compose,
    compose_config,
    healthcheck_parts,
    parse_dockerfile,
    stage_chain,
)

pytestmark = pytest.mark.host  # docker-compose validates the file

SERVERS = {"server-asyncio": "asyncio", "server-uvloop": "uvloop"}
CORE_SERVICES = {*SERVERS, "locust-master", "locust-worker"}
PROFILES = {
    "compare": {"compare"},
    "observability": {"prometheus", "grafana"},
    "realworld": {"postgres"},
    "matrix": {"matrix"},
}
# compose's own knobs keep the one-shot compare short here: users, seconds and rounds
BOUNDED = {"COMPARE_ROUNDS": "1", "COMPARE_USERS": "4", "COMPARE_DURATION": "3"}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """Every service, all profiles on, as `docker-compose config` resolves them."""
    config = compose_config(*PROFILES, env=BOUNDED)
    found: dict[str, Any] = config["services"]
    return found


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
    """Same image, CPUs, limits, database and healthcheck; only the loop and host port differ."""
    specs = {name: services[name] for name in SERVERS}
    for name, loop in SERVERS.items():
        assert specs[name]["environment"] == {
            "LOOP_LAB_LOOP": loop,
            "LOOP_LAB_DATABASE_URL": "postgresql://looplab:looplab@postgres:5432/looplab",
        }
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


def test_nofile_is_settable_for_engines_with_a_lower_hard_limit() -> None:
    """NOFILE sets every service's open-file limit (an engine cannot grant more than its own)."""
    specs = compose_config("compare", env={"NOFILE": "20000"})["services"]
    for name in (*SERVERS, "locust-master", "locust-worker", "compare"):
        assert specs[name]["ulimits"]["nofile"] == {"soft": 20000, "hard": 20000}, name


def test_service_names_in_commands_name_services_and_their_ports() -> None:
    """What only the bridge network does: each host a command names is a service of the file,
    on the port that service listens on (the published ports stay on 127.0.0.1)."""
    specs = compose_config("compare")["services"]
    server_port = str(Settings().port)  # the servers set no LOOP_LAB_PORT: they listen on this
    listens = {**dict.fromkeys(SERVERS, server_port), "locust-master": "5557"}
    found = set()
    for name in ("locust-master", "locust-worker", "compare"):
        for arg in specs[name]["command"]:
            flag, _, value = arg.partition("=")
            if flag in ("--host", "--asyncio-url", "--uvloop-url"):
                host, port = value.removeprefix("http://").split(":")
                assert listens[host] == port, arg
                found.add(host)
            elif flag == "--master-host":
                found.add(value)
                master_port = next(a for a in specs[name]["command"] if "--master-port=" in a)
                assert master_port == f"--master-port={listens[value]}"
    assert found == set(listens)
    for name in SERVERS:  # the realworld profile's postgres, on the port its image listens on
        url = specs[name]["environment"]["LOOP_LAB_DATABASE_URL"]
        assert url.split("@")[1].split("/")[0] == "postgres:5432"
    assert "postgres" in specs
    for name in SERVERS:
        assert "LOOP_LAB_PORT" not in specs[name]["environment"]
        (published,) = specs[name]["ports"]
        assert published.split("/")[0].rsplit(":", 1)[1] == server_port, published


@pytest.fixture(scope="module")
def host_services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """compose-test's host-network variant, as `docker-compose config` resolves it."""
    path = tmp_path_factory.mktemp("host") / "compose.host.yml"
    compose_test.write_host_variant(path)
    result = compose("--profile", "compare", "--profile", "realworld", "config", file=path)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return found


def test_host_variant_differs_from_the_file_only_as_documented(
    host_services: dict[str, Any],
) -> None:
    """The variant compose-test runs: host networking, no ports or sysctls, loopback ports in
    the servers' env and the commands; the registry-only services left out. Nothing else."""
    real = compose_config("compare", "realworld")["services"]
    assert set(real) - set(host_services) == set(compose_test.REGISTRY_ONLY)
    assert set(host_services) <= set(real)
    swaps = {}
    for name in host_services:
        spec = real[name]
        host = dict(host_services[name])
        assert host.pop("network_mode") == "host"
        dropped = ("ports", "sysctls", "networks", "network_mode")  # matrix is host already
        expected = {k: v for k, v in spec.items() if k not in dropped}
        host.pop("networks", None)
        if name in SERVERS:
            env = host.pop("environment")
            assert env.pop("LOOP_LAB_HOST") == "127.0.0.1"
            assert int(env.pop("LOOP_LAB_PORT")) == compose_test.PORTS[name]
            real_env = expected.pop("environment")
            database = real_env.pop("LOOP_LAB_DATABASE_URL").replace(
                "@postgres:5432/", f"@127.0.0.1:{compose_test.PORTS['postgres']}/"
            )
            assert env.pop("LOOP_LAB_DATABASE_URL") == database
            assert env == real_env
        if name == "postgres":
            env = host.pop("environment")
            assert int(env.pop("PGPORT")) == compose_test.PORTS[name]
            assert env == expected.pop("environment")
            assert host.pop("command") == ["postgres", "-c", "listen_addresses=127.0.0.1"]
        if "command" in spec:
            pairs = zip(spec["command"], host.pop("command"), strict=True)
            swaps.update({a: b for a, b in pairs if a != b})
            expected.pop("command")
        assert host == expected, name
    # every changed argument names a loopback address or one of compose-test's ports
    ports = {str(p) for p in compose_test.PORTS.values()}
    for old, new in swaps.items():
        assert "127.0.0.1" in new or new.rsplit("=", 1)[1] in ports, (old, new)


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


def test_matrix_profile_drives_the_engine_it_runs_on(services: dict[str, Any]) -> None:
    """The matrix service runs `loop-lab matrix` from its own image with the engine's socket, the
    host's network and pids, the checkout as build context, and never makes stand-ins."""
    matrix = services["matrix"]
    assert matrix["build"]["target"] == "matrix"
    assert matrix["network_mode"] == "host"
    assert matrix["pid"] == "host"
    # docker-compose 1.x resolves them to the short form SOURCE:TARGET:MODE
    mounts = {
        target: (source, mode) for source, target, mode in (v.split(":") for v in matrix["volumes"])
    }
    assert mounts["/var/run/docker.sock"][0] == "/var/run/docker.sock"
    assert mounts["/src"] == (str(REPO), "ro")
    assert matrix["command"][:2] == ["loop-lab", "matrix"]
    assert {"--context=/src", "--no-standins"} <= set(matrix["command"])
    assert copied_from("matrix") == copied_from("load")  # the load image's venv: locust, plots


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
    """CMD is `loop-lab serve` with LOOP_LAB_HOST=0.0.0.0 (env, so host networking can bind
    127.0.0.1); the HEALTHCHECK is a python one-liner on /healthz."""
    server = stage_chain(parse_dockerfile(), "server")[-1]
    (cmd,) = server.all("CMD")
    assert json.loads(cmd.args) == ["loop-lab", "serve"]
    env = [shlex.split(ins.args) for ins in server.all("ENV")]
    assert ["LOOP_LAB_HOST=0.0.0.0"] in env
    (healthcheck,) = server.all("HEALTHCHECK")
    options, command = healthcheck_parts(healthcheck.args)
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2]
    assert {"interval", "timeout", "retries"} <= set(options)


def test_server_stages_come_before_any_load_stage() -> None:
    """Docker's legacy builder builds every stage above the target: `--target server` must find
    only its own chain there, and no `# syntax=` line asks BuildKit for a registry."""
    stages = parse_dockerfile()
    names = [stage.name for stage in stages]
    server_chain = [stage.name for stage in stage_chain(stages, "server")]
    above = names[: names.index("server") + 1]
    builds = {"build", "build-base", "deps", *server_chain}
    assert set(above) <= builds, above
    assert not (REPO / "Dockerfile").read_text().startswith("# syntax=")


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
