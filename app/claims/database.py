"""Claims about database drivers: a synchronous driver on the loop freezes it, an async one not.

SQLite: a recursive query calibrated to about BLOCK seconds of SQLite's own work, through `sqlite3`
on the loop and through `aiosqlite`. PostgreSQL: `SELECT pg_sleep(BLOCK)` through psycopg's
blocking and async connections, against $LOOP_LAB_DATABASE_URL or a throwaway cluster started from
Debian's binaries (app.pgcluster).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager

import aiosqlite
import psycopg

from app.claims.blocking import BLOCK, TICK, _watch
from app.claims.probes import ms, per_loop
from app.claims.registry import Outcome, claim, verdict_of
from app.pgcluster import ClusterError, throwaway_cluster

COUNT = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
    "SELECT count(*) FROM c"
)


def _calibrate() -> int:
    """Rows the recursive query must generate to take about BLOCK seconds here."""
    rows = 100_000
    conn = sqlite3.connect(":memory:")
    try:
        while True:
            started = time.perf_counter()
            conn.execute(COUNT, (rows,)).fetchall()
            took = time.perf_counter() - started
            if took > BLOCK / 4:
                return int(rows * BLOCK / took)
            rows *= 4
    finally:
        conn.close()


@contextmanager
def _postgres_url() -> Iterator[str]:
    url = os.environ.get("LOOP_LAB_DATABASE_URL", "")
    if url:
        yield url
        return
    with throwaway_cluster() as cluster:
        yield cluster.url


def _forms(rows: int, url: str) -> dict[str, Callable[[], Awaitable[object]]]:
    async def sqlite3_on_loop() -> None:
        conn = sqlite3.connect(":memory:")
        try:
            conn.execute(COUNT, (rows,)).fetchall()  # blocking: the point of the experiment
        finally:
            conn.close()

    async def aiosqlite_query() -> None:
        async with aiosqlite.connect(":memory:") as conn:
            await (await conn.execute(COUNT, (rows,))).fetchall()

    async def psycopg_blocking() -> None:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT pg_sleep(%s)", (BLOCK,))

    async def psycopg_async() -> None:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=5) as conn:
            await conn.execute("SELECT pg_sleep(%s)", (BLOCK,))

    return {
        "sqlite3": sqlite3_on_loop,
        "aiosqlite": aiosqlite_query,
        "psycopg": psycopg_blocking,
        "psycopg async": psycopg_async,
    }


BLOCKING = ("sqlite3", "psycopg")


@claim(
    "sync_database_driver_freezes_loop",
    claim="A database query through a synchronous driver (sqlite3, psycopg) freezes the whole "
    "loop; the same query through an async driver (aiosqlite, psycopg async) does not.",
    quote="Calling time.sleep() or a synchronous database query blocks the event loop, freezing "
    "all other tasks.",
    timeout=60.0,
)
def sync_database_driver_freezes_loop() -> Outcome:
    rows = _calibrate()
    missing = ""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(_postgres_url())
        except (ClusterError, OSError, subprocess.CalledProcessError) as exc:
            url, missing = "", f"PostgreSQL unavailable ({exc})"
        forms = _forms(rows, url)
        if not url:
            forms = {k: v for k, v in forms.items() if not k.startswith("psycopg")}
        runs = per_loop(lambda name: {form: _watch(name, run) for form, run in forms.items()})
    checks: dict[str, bool] = {}
    for name, by_form in runs.items():
        for form, (ticks, gap) in by_form.items():
            # no tick at all through a gap of many ticks (SQLite's calibration varies with load)
            frozen = ticks == 0 and gap >= BLOCK / 2
            free = ticks >= 3 and gap < BLOCK / 2
            checks[f"{name} {form}"] = frozen if form in BLOCKING else free
    if missing:
        checks["PostgreSQL checked"] = False
    parts = [
        f"{name}: "
        + ", ".join(f"{form} {ticks} ticks (gap {ms(gap)})" for form, (ticks, gap) in by.items())
        for name, by in runs.items()
    ]
    what = (
        f"a {ms(TICK)} ticker beside one query: SQLite counting {rows:,} rows recursively "
        f"(~{ms(BLOCK)}), PostgreSQL pg_sleep({BLOCK})"
    )
    if missing:
        what += f"; {missing}"
    return Outcome(verdict_of(checks), f"{what}; " + "; ".join(parts), {"runs": runs})
