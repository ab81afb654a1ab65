"""The observability profile: Prometheus config, a real Prometheus scraping real servers, and the
Grafana provisioning and dashboard, whose every query must name real metrics and return data."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.launch import ServerThread, free_port, running_server
from app.loops import LOOP_NAMES
from tests.deploy_support import (
    REPO,
    Service,
    answers_ok,
    compose_config,
    http_get,
    http_json,
    require_program,
    wait_for,
)

pytestmark = pytest.mark.host  # promtool, a real Prometheus, docker-compose

PROMETHEUS_CONFIG = REPO / "deploy/prometheus/prometheus.yml"
GRAFANA = REPO / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/loop-lab.json"
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning/dashboards/loop-lab.yml"
METRIC = re.compile(r"\blooplab_[a-z0-9_]+\b")
SCRAPE_INTERVAL = "1s"
RATE_WINDOW = "10s"  # stands in for Grafana's $__rate_interval: several 1 s scrapes


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(panel title, PromQL, panel repeats per $loop) for every query on the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"], panel.get("repeat") == "loop"))
    return queries


def exported_metric_names(url: str) -> set[str]:
    """Sample names in a real server's /metrics after it served a demo request."""
    answer = http_get(f"{url}/await?delay=0")
    assert answer is not None
    assert answer[0] == 200
    metrics = http_get(f"{url}/metrics")
    assert metrics is not None
    names = set()
    for line in metrics[1].decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# ---- config files ---------------------------------------------------------------------------


def test_promtool_accepts_the_config() -> None:
    """`promtool check config` passes on deploy/prometheus/prometheus.yml."""
    promtool = require_program("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check is real: a scrape interval that is not a duration fails it."""
    promtool = require_program("promtool")
    broken = tmp_path / "prometheus.yml"
    broken.write_text(
        PROMETHEUS_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: soon")
    )
    result = subprocess.run(
        [promtool, "check", "config", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_prometheus_scrapes_both_compose_servers_as_mounted() -> None:
    """Prometheus's targets are the two server services' container port, and compose mounts the
    config where the prometheus command reads it."""
    services = compose_config("observability")["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    }
    assert targets == {"server-asyncio:8080", "server-uvloop:8080"}
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"]
    )
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in prometheus["volumes"]}
    assert mounts[config_flag.split("=", 1)[1]] == PROMETHEUS_CONFIG


def test_grafana_provisioning_points_at_compose_prometheus_and_the_dashboard() -> None:
    """The datasource URL is the prometheus service, the provider path is where compose mounts
    the dashboards, and every panel uses the provisioned datasource uid."""
    services = compose_config("observability")["services"]
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    url = urllib.parse.urlsplit(datasource["url"])
    assert url.hostname == "prometheus"
    assert url.port == 9090
    assert "prometheus" in services
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {datasource["uid"]}


def test_dashboard_names_only_metrics_the_server_exports() -> None:
    """Every looplab_* name in the dashboard is a sample name on a real server's /metrics, and
    the dashboard covers the metrics the issue asks for."""
    with running_server("asyncio") as server:
        exported = exported_metric_names(server.url)
    text = DASHBOARD.read_text()
    named = set(METRIC.findall(text))
    assert named, "the dashboard names no looplab metrics"
    assert named <= exported, f"not exported: {sorted(named - exported)}"
    wanted = {
        "looplab_loop_lag_seconds_bucket",
        "looplab_handler_step_seconds_bucket",
        "looplab_in_flight_requests",
        "looplab_open_connections",
        "looplab_requests_total",
        "looplab_loop_info",
    }
    assert wanted <= named


# ---- a real Prometheus against real servers -------------------------------------------------


@dataclass
class Scrape:
    prometheus: str
    servers: dict[str, ServerThread]

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = http_json(url)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def traffic(self) -> None:
        """A few cheap requests per server, so per-route rates are not empty."""
        for server in self.servers.values():
            for path in ("/await?delay=0", "/block?delay=0.001", "/offload?delay=0"):
                http_get(f"{server.url}{path}")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """Debian's Prometheus on a free loopback port, scraping an asyncio and a uvloop loop-lab
    every second, with the shipped config's scrape job pointed at them."""
    prometheus = require_program("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    with running_server("asyncio") as on_asyncio, running_server("uvloop") as on_uvloop:
        servers = {"asyncio": on_asyncio, "uvloop": on_uvloop}
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"]["scrape_interval"] = SCRAPE_INTERVAL
        config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
        (job,) = config["scrape_configs"]
        job["static_configs"] = [
            {"targets": [s.url.removeprefix("http://") for s in servers.values()]}
        ]
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        service = Service(
            "prometheus",
            [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            {"PATH": "/usr/bin:/bin"},
            work,
            work,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for("prometheus /-/ready", lambda: answers_ok(f"{url}/-/ready"), 60, service)
            yield Scrape(url, servers)
        finally:
            service.stop()


def test_prometheus_scrapes_loop_lag_from_both_loops(scrape: Scrape) -> None:
    """Prometheus's API returns looplab_loop_lag_seconds for both servers, each target up."""

    def lag_from_both() -> list[dict[str, Any]] | None:
        result = scrape.query(
            "looplab_loop_lag_seconds_count * on (instance) group_left (loop) looplab_loop_info"
        )
        return result if {r["metric"]["loop"] for r in result} == set(LOOP_NAMES) else None

    result = wait_for("looplab_loop_lag_seconds from both loops", lag_from_both, 30)
    assert all(float(r["value"][1]) > 0 for r in result)
    up = {r["metric"]["instance"]: r["value"][1] for r in scrape.query("up")}
    assert up == {s.url.removeprefix("http://"): "1" for s in scrape.servers.values()}


def test_every_dashboard_query_returns_data_for_each_loop(scrape: Scrape) -> None:
    """Every panel's PromQL, with Grafana's variables filled in, evaluates on the real scrape to
    finite values; overlaid panels show both loops, repeated panels have data for each loop."""
    pending = {
        (title, expr, loop, repeats)
        for title, expr, repeats in dashboard_queries()
        for loop in (LOOP_NAMES if repeats else ("|".join(LOOP_NAMES),))
    }

    def evaluate() -> bool | None:
        scrape.traffic()
        for title, expr, loop, repeats in sorted(pending):
            concrete = expr.replace("$__rate_interval", RATE_WINDOW).replace("$loop", loop)
            result = [r for r in scrape.query(concrete) if r["value"][1] not in ("NaN", "+Inf")]
            loops = {r["metric"]["loop"] for r in result if "loop" in r["metric"]}
            # a repeated panel groups `loop` away: its $loop filter picks the server instead
            if result and (loops == set(loop.split("|")) or (repeats and not loops)):
                pending.discard((title, expr, loop, repeats))
        return True if not pending else None

    wait_for(lambda: f"data for these dashboard queries: {sorted(pending)}", evaluate, 45)
    assert not pending
