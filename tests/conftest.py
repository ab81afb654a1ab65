from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.launch import ServerThread, running_server
from app.loops import LOOP_NAMES, LoopName
from app.pgcluster import Cluster, throwaway_cluster


@pytest.fixture(params=LOOP_NAMES)
def loop_name(request: pytest.FixtureRequest) -> LoopName:
    """Run the test once on the default asyncio loop and once on uvloop."""
    name: LoopName = request.param
    return name


@pytest.fixture
def server(loop_name: LoopName) -> Iterator[ServerThread]:
    """A real loop-lab server on 127.0.0.1:0, on the parametrized loop."""
    with running_server(loop_name) as running:
        yield running


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (Debian's binaries) for the session, removed at the end."""
    with throwaway_cluster() as cluster:
        yield cluster
