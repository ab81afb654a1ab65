"""`/db`: a real database query through a blocking driver on the loop, in the pool, or async.

SQLite by default (a file in a temporary directory, nothing to set up): `sync` is `sqlite3` on the
loop thread, `offload` the same in the thread pool, `async` is `aiosqlite` (a thread per connection
behind an async API). With `--database-url`, PostgreSQL: `psycopg`'s blocking connections (on the
loop, or in the pool) and its async ones, each from a pool opened at start and closed at shutdown.

A database that is down, unreachable or too slow answers 503 JSON within the connect or query
timeout; the pools reconnect by themselves once it is back.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Literal
from urllib.parse import urlsplit

import aiosqlite
import psycopg
import psycopg_pool
from aiohttp import web

from app.config import Settings
from app.executors import worker_sleep
from app.keys import DATABASE, EXECUTORS, SETTINGS
from app.params import choice_param, delay_param
from app.policy import ensure_allowed
from app.responses import demo_response, unavailable

routes = web.RouteTableDef()

Driver = Literal["sync", "offload", "async"]
DRIVERS: tuple[Driver, ...] = ("sync", "offload", "async")
ROWS = 10  # rows each query fetches after its wait
# a pool gives a connection up after retrying this long (backoff 1, 2, 4 s); the next request that
# finds no connection asks for a new one, so recovery never waits behind a long backoff
RECONNECT_S = 5.0
Rows = list[tuple[Any, ...]]

# SQLite has no sleep(): `sleep` is a Python function registered on each connection, called by the
# query the way PostgreSQL's pg_sleep is, so the driver waits inside the query as it would on a
# slow one (docs/benchmarks.md, "Real loop killers", says why not a CPU-bound query).
SQLITE_QUERIES = (
    "SELECT sleep(?)",
    f"SELECT id, name FROM items ORDER BY id LIMIT {ROWS}",
)
POSTGRES_QUERIES = (
    "SELECT pg_sleep(%s)",
    f"SELECT n, md5(n::text) FROM generate_series(1, {ROWS}) AS n",
)


def _sqlite_sleep(seconds: float) -> float:
    worker_sleep(seconds)  # in a pool worker, pool shutdown can wake it (app.executors)
    return seconds


def _sqlite_connect(path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout)
    conn.create_function("sleep", 1, _sqlite_sleep)
    return conn


def _sqlite_query(path: Path, timeout: float, delay: float) -> Rows:
    """The whole query with `sqlite3`: connect, wait `delay` inside SQLite, fetch rows, close."""
    conn = _sqlite_connect(path, timeout)
    try:
        conn.execute(SQLITE_QUERIES[0], (delay,)).fetchall()
        return conn.execute(SQLITE_QUERIES[1]).fetchall()
    finally:
        conn.close()


def _sqlite_create(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO items (id, name) VALUES (?, ?)", [(i, f"item-{i}") for i in range(1, 101)]
        )
    conn.close()


def _postgres_query(pool: psycopg_pool.ConnectionPool, timeout: float, delay: float) -> Rows:
    """The whole query with psycopg's blocking API: every wait here blocks the calling thread."""
    with pool.connection(timeout=timeout) as conn:
        conn.execute(POSTGRES_QUERIES[0], (delay,))
        return conn.execute(POSTGRES_QUERIES[1]).fetchall()


def display_url(url: str) -> str:
    """The database URL without its password, fit for responses and logs."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


@dataclass
class Database:
    """The database /db queries and its connections; the pools exist only for PostgreSQL."""

    kind: Literal["sqlite", "postgresql"]
    where: str  # the SQLite file, or the PostgreSQL URL without its password
    settings: Settings
    sqlite_path: Path | None = None
    sqlite_pool: asyncio.Queue[aiosqlite.Connection] | None = None
    sync_pool: psycopg_pool.ConnectionPool | None = None
    async_pool: psycopg_pool.AsyncConnectionPool | None = None

    @property
    def queries(self) -> Sequence[str]:
        return SQLITE_QUERIES if self.kind == "sqlite" else POSTGRES_QUERIES

    def unavailable(self, driver: str, error: BaseException | str) -> web.HTTPException:
        return unavailable("database", error, database=f"{self.kind} {self.where}", driver=driver)

    def query_blocking(self, delay: float) -> Rows:
        """The blocking driver's query, run by whichever thread calls it."""
        if self.sqlite_path is not None:
            return _sqlite_query(self.sqlite_path, self.settings.db_connect_timeout, delay)
        assert self.sync_pool is not None
        return _postgres_query(self.sync_pool, self.settings.db_connect_timeout, delay)

    async def query_async(self, delay: float) -> Rows:
        """The async driver's query: every wait here hands the loop back."""
        if self.sqlite_pool is not None:
            lite = await self.sqlite_pool.get()
            try:
                await (await lite.execute(SQLITE_QUERIES[0], (delay,))).fetchall()
                return [
                    tuple(row) for row in await (await lite.execute(SQLITE_QUERIES[1])).fetchall()
                ]
            finally:
                self.sqlite_pool.put_nowait(lite)
        assert self.async_pool is not None
        async with self.async_pool.connection(timeout=self.settings.db_connect_timeout) as conn:
            await conn.execute(POSTGRES_QUERIES[0], (delay,))
            cursor = await conn.execute(POSTGRES_QUERIES[1])
            return await cursor.fetchall()


@asynccontextmanager
async def _sqlite(settings: Settings) -> AsyncIterator[Database]:
    loop = asyncio.get_running_loop()
    directory = Path(tempfile.mkdtemp(prefix="looplab-db-"))
    path = directory / "looplab.sqlite3"
    pool: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
    try:
        await loop.run_in_executor(None, _sqlite_create, path)
        for _ in range(settings.db_pool_size):
            conn = await aiosqlite.connect(path, timeout=settings.db_connect_timeout)
            await conn.create_function("sleep", 1, _sqlite_sleep)
            pool.put_nowait(conn)
        yield Database("sqlite", str(path), settings, sqlite_path=path, sqlite_pool=pool)
    finally:
        while not pool.empty():
            await pool.get_nowait().close()
        await loop.run_in_executor(None, shutil.rmtree, directory, True)


@asynccontextmanager
async def _postgres(settings: Settings) -> AsyncIterator[Database]:
    url = settings.database_url
    kwargs: dict[str, Any] = {
        "autocommit": True,
        # libpq counts whole seconds and takes at least 2
        "connect_timeout": max(2, round(settings.db_connect_timeout)),
        # the server cancels a query that runs longer, so no connection stays stuck in one
        "options": f"-c statement_timeout={round(settings.db_query_timeout * 1000)}",
    }
    size = settings.db_pool_size
    # open=False, then open(wait=False): a database that is down delays no start-up; the pools'
    # own threads and tasks keep connecting until it is back. `check` drops connections that died
    # with a restarted server before a request gets one.
    pool_options: dict[str, Any] = {
        "kwargs": kwargs,
        "min_size": size,
        "max_size": size,
        "open": False,
        "reconnect_timeout": RECONNECT_S,
    }
    sync_pool = psycopg_pool.ConnectionPool(
        url,
        check=psycopg_pool.ConnectionPool.check_connection,
        name="looplab-blocking",
        **pool_options,
    )
    async_pool = psycopg_pool.AsyncConnectionPool(
        url,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        name="looplab-async",
        **pool_options,
    )
    loop = asyncio.get_running_loop()
    sync_pool.open(wait=False)
    await async_pool.open(wait=False)
    try:
        yield Database(
            "postgresql", display_url(url), settings, sync_pool=sync_pool, async_pool=async_pool
        )
    finally:
        await async_pool.close()
        # closing the blocking pool joins its threads: keep that off the loop
        await loop.run_in_executor(None, sync_pool.close)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    opened = _postgres(settings) if settings.database_url else _sqlite(settings)
    async with opened as database:
        app[DATABASE] = database
        yield


# what the drivers raise for a database that is down, gone mid-query or too slow
_UNAVAILABLE = (sqlite3.Error, psycopg.Error, psycopg_pool.PoolTimeout, OSError)


@routes.get("/db")
async def db_handler(request: web.Request) -> web.Response:
    started = perf_counter()
    delay = delay_param(request, default=0.1)
    driver = choice_param(request, "driver", DRIVERS, "async")
    if driver == "sync":
        ensure_allowed(request, "runs a blocking database query on the event loop")
    database = request.app[DATABASE]
    settings = request.app[SETTINGS]
    try:
        if driver == "sync":
            rows = database.query_blocking(delay)  # the loop waits for the database: the bug
        elif driver == "offload":
            rows = await request.app[EXECUTORS].thread.run(database.query_blocking, delay)
        else:
            # a bound on the whole query, on top of the server's own statement_timeout
            limit = settings.db_connect_timeout + settings.db_query_timeout
            async with asyncio.timeout(limit):
                rows = await database.query_async(delay)
    except TimeoutError:
        raise database.unavailable(driver, "no answer within the connect + query timeout") from None
    except _UNAVAILABLE as exc:
        raise database.unavailable(driver, exc) from None
    return demo_response(
        request,
        "db",
        started,
        driver=driver,
        delay=delay,
        database=database.kind,
        where=database.where,
        query=[q.replace("?", repr(delay)).replace("%s", repr(delay)) for q in database.queries],
        rows=len(rows),
        first_row=list(rows[0]) if rows else None,
    )
