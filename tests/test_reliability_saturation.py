"""Executor saturation: a flood of /offload meets a bounded queue and 503 + Retry-After
(docs/reliability.md, 4)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from app.launch import ServerProcess
from app.loops import LoopName
from app.monitor.process import raise_nofile_limit
from tests.reliability_support import get_json, http_get, rss_mb

pytestmark = pytest.mark.slow

WORKERS = 4
QUEUE = 16
FLOOD = 1000
WAVES = 3
DELAY = 0.2


async def test_offload_flood_is_bounded(loop_name: LoopName) -> None:
    """Waves of 1,000 concurrent /offload at a 4-worker pool: the queue never passes its bound,
    the excess gets 503 with a JSON reason and Retry-After, and RSS stays flat across waves."""
    raise_nofile_limit()
    server = await ServerProcess(
        "--loop",
        loop_name,
        "--thread-workers",
        str(WORKERS),
        "--pool-queue",
        str(QUEUE),
        "--max-delay",
        "5",
    ).start()
    rss: list[float] = []
    statuses: Counter[int] = Counter()
    try:
        for _ in range(WAVES):
            answers = await asyncio.gather(
                *(http_get(server.port, f"/offload?delay={DELAY}") for _ in range(FLOOD))
            )
            statuses.update(status for status, _, _ in answers)
            refused = [(h, b) for s, h, b in answers if s == 503]
            assert refused, "a flood 60x the pool's capacity must be refused in part"
            for headers, body in refused:
                assert headers["retry-after"].isdigit()
                assert int(headers["retry-after"]) >= 1
                reason = json.loads(body)
                assert set(reason) >= {"error", "param", "allowed"}
            rss.append(rss_mb(server.pid))
        stats = await get_json(server.port, "/stats")
        status, _, _ = await http_get(server.port, "/healthz")
    finally:
        await server.stop()

    assert set(statuses) == {200, 503}
    assert statuses[200] >= WAVES * (WORKERS + QUEUE)  # at least a full pool's worth each wave
    limits = stats["executor_limits"]["thread"]
    assert limits["queue_limit"] == QUEUE
    assert limits["peak_queued"] <= QUEUE
    assert limits["rejected"] == statuses[503]
    assert stats["executor"]["thread"]["queued"] == 0
    assert stats["routes"]["/offload"]["errors"] == statuses[503]  # counted as 5xx, not hidden
    assert status == 200
    assert rss[-1] - rss[0] < 10.0, rss  # flat: waves 2 and 3 cost no new memory
    print(f"\n[{loop_name}] {dict(statuses)}; peak queued {limits['peak_queued']}; RSS MB {rss}")
