"""The locust scenarios under loadtest/ and where to find them."""

from __future__ import annotations

import os
from pathlib import Path

SCENARIOS: dict[str, str] = {
    "multiplex": "N users, each holding one keep-alive connection parked in /await",
    "starvation": "the crowd plus blockers on /block (time.sleep on the loop) and a /healthz probe",
    "offload": "the starvation load with the blocking call moved to a thread (/offload)",
    "cpu": "phases: calm, /cpu inline, /cpu in a thread, /cpu in a process (crowd + probe)",
    "story": "phases: calm, starvation, recovery, offload, calm (crowd + probe)",
    "realworld": "phases: /db sync, offload, async; /upstream requests, aiohttp; /json inline, "
    "process (crowd + probe)",
}
# scenarios whose LoadTestShape walks through phases (and reads -u/-r/-t itself)
PHASED = frozenset({"cpu", "story", "realworld"})
LOADTEST_ENV = "LOOP_LAB_LOADTEST_DIR"


class ScenarioError(LookupError):
    """The scenario is unknown or its locustfile cannot be found."""


def loadtest_dir() -> Path:
    """loadtest/: $LOOP_LAB_LOADTEST_DIR, else next to this package in the repo, else ./loadtest."""
    override = os.environ.get(LOADTEST_ENV)
    candidates = (
        [Path(override)]
        if override
        else [Path(__file__).resolve().parents[2] / "loadtest", Path.cwd() / "loadtest"]
    )
    for candidate in candidates:
        if (candidate / "looplab_users.py").is_file():
            return candidate
    raise ScenarioError(
        f"no loadtest/ directory with the locust scenarios in {', '.join(map(str, candidates))}; "
        f"run from the repository or set {LOADTEST_ENV}"
    )


def locustfile(scenario: str) -> Path:
    if scenario not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    return loadtest_dir() / f"{scenario}.py"
