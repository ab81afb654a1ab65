"""One typed settings object, built once from `--flags` and `LOOP_LAB_*` env vars (flags win)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from app.loops import LOOP_NAMES, LoopName
from app.monitor.lag import LAG_INTERVAL_S
from app.monitor.utilization import INTERVAL_S as UTILIZATION_INTERVAL_S

ENV_PREFIX = "LOOP_LAB_"

# how the server runs CPython's garbage collector (app.gctune)
GcMode = Literal["default", "tuned", "off"]
GC_MODES: tuple[GcMode, ...] = get_args(GcMode)


class SettingError(ValueError):
    """A setting could not be parsed or is out of range; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Settings:
    loop: LoopName = "asyncio"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    backlog: int = 4096
    thread_workers: int = 8
    process_workers: int = 2
    max_delay: float = 60.0
    debug: bool = False
    access_log: bool = False
    # seconds the watchdog lets the loop go without running before it logs a stack
    stall_threshold: float = 0.5
    # seconds between the lag sampler's ticks (also the watchdog's heartbeat)
    lag_interval: float = LAG_INTERVAL_S
    # mean seconds between the utilisation sampler's looks at the loop thread; 0: no sampler
    utilization_interval: float = UTILIZATION_INTERVAL_S
    # seconds in-flight requests get to finish after SIGTERM/SIGINT
    grace: float = 30.0
    # reliability limits (docs/reliability.md): every one bounds what a client can hold
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    pool_queue: int = 256
    max_connections: int = 0  # 0: derived from the fd limit at start
    max_body_size: int = 65_536
    disable_blocking: bool = False
    gc: GcMode = "tuned"
    # real loop killers (app.database, app.upstream, app.resolving): "" = the embedded default
    database_url: str = ""
    db_connect_timeout: float = 5.0
    db_query_timeout: float = 30.0
    db_pool_size: int = 10
    upstream_url: str = ""
    upstream_timeout: float = 30.0
    # asyncio's own default is min(32, cpus + 4), created on first use; set here to be counted
    default_executor_workers: int = min(32, (os.cpu_count() or 1) + 4)


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"must be a whole number in {lo}..{hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be in {lo}..{hi}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"must be a number in {lo:g}..{hi:g}, got {text!r}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise ValueError(f"must be in {lo:g}..{hi:g}, got {text!r}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true/false (1/0, yes/no, on/off), got {text!r}")


def _loop(text: str) -> LoopName:
    if text not in LOOP_NAMES:
        raise ValueError(f"must be one of {', '.join(LOOP_NAMES)}, got {text!r}")
    return "uvloop" if text == "uvloop" else "asyncio"


def _gc(text: str) -> GcMode:
    for mode in GC_MODES:
        if text.strip() == mode:
            return mode
    raise ValueError(f"must be one of {', '.join(GC_MODES)}, got {text!r}")


def _host(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _database_url(text: str) -> str:
    text = text.strip()
    if text and urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be empty (SQLite) or a postgresql://user@host:port/dbname URL")
    return text


def _upstream_url(text: str) -> str:
    text = text.strip().rstrip("/")
    if text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"must be empty (start our own) or an http://host:port URL, got {text!r}"
            )
    return text


_PARSERS: dict[str, Callable[[str], Any]] = {
    "loop": _loop,
    "host": _host,
    "port": _int(0, 65535),
    "workers": _int(1, 64),
    "backlog": _int(1, 65535),
    "thread_workers": _int(1, 1024),
    "process_workers": _int(1, 64),
    "max_delay": _float(0.0, 3600.0),
    "debug": _bool,
    "access_log": _bool,
    "stall_threshold": _float(0.01, 60.0),
    "lag_interval": _float(0.001, 10.0),
    "utilization_interval": _float(0.0, 10.0),
    "grace": _float(0.0, 600.0),
    "header_timeout": _float(0.0, 3600.0),
    "keepalive_timeout": _float(0.0, 86400.0),
    "pool_queue": _int(0, 1_000_000),
    "max_connections": _int(0, 10_000_000),
    "max_body_size": _int(1, 1 << 30),
    "disable_blocking": _bool,
    "gc": _gc,
    "database_url": _database_url,
    "db_connect_timeout": _float(0.1, 600.0),
    "db_query_timeout": _float(0.1, 3600.0),
    "db_pool_size": _int(1, 1000),
    "upstream_url": _upstream_url,
    "upstream_timeout": _float(0.1, 3600.0),
    "default_executor_workers": _int(1, 1024),
}

_HELP: dict[str, str] = {
    "loop": "event loop implementation",
    "host": "address to bind (loopback unless you mean to expose it)",
    "port": "TCP port (0 picks a free one)",
    "workers": "processes sharing the port via SO_REUSEPORT",
    "backlog": "listen backlog (the kernel caps it at net.core.somaxconn)",
    "thread_workers": "threads in the /offload and /cpu thread pool",
    "process_workers": "processes in the /offload and /cpu process pool",
    "max_delay": "largest delay= (seconds) a request may ask for",
    "debug": "asyncio debug mode with a slow-callback warning threshold",
    "access_log": "log every request",
    "stall_threshold": "seconds without a loop turn before the watchdog logs the loop's stack",
    "lag_interval": "seconds between the lag sampler's ticks, the watchdog's heartbeat (keep it "
    "under --stall-threshold)",
    "utilization_interval": "mean seconds between the utilisation sampler's looks at the loop "
    "thread (0: no sampler, /stats utilization is null)",
    "grace": "seconds in-flight requests get to finish on SIGTERM/SIGINT",
    "header_timeout": "seconds a client gets to send a request's line and headers, from connect or "
    "the request's first byte; then 408 and close (0 = off)",
    "keepalive_timeout": "seconds an idle keep-alive connection stays open between requests "
    "(0 = close after each response)",
    "pool_queue": "jobs that may wait for a busy worker, per pool; more get 503 + Retry-After",
    "max_connections": "open connections before new ones get 503 (0 = fd limit minus a reserve)",
    "max_body_size": "largest request body in bytes; a larger Content-Length gets 413",
    "disable_blocking": "answer /block and /cpu with 403 (for shared deployments)",
    "gc": "garbage collector: tuned (startup objects frozen, young collections every 50 ms, "
    "full collections 100x rarer), default (CPython as shipped) or off",
    "database_url": "PostgreSQL for /db, e.g. postgresql://user@127.0.0.1:5432/db "
    "(empty: SQLite in a temporary file)",
    "db_connect_timeout": "seconds /db waits for a database connection before answering 503",
    "db_query_timeout": "seconds a /db query may run (PostgreSQL statement_timeout) before 503",
    "db_pool_size": "connections per PostgreSQL pool (one blocking, one async) and aiosqlite",
    "upstream_url": "the slow HTTP server /upstream calls, serving /await?delay= "
    "(empty: start our own on loopback, in a thread with its own loop)",
    "upstream_timeout": "seconds an /upstream call may take before 503",
    "default_executor_workers": "threads in the loop's default executor (loop.getaddrinfo on "
    "asyncio, run_in_executor(None, ...))",
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults stay None so env and defaults can fill the gaps."""
    defaults = Settings()
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} (env {env_name(f.name)}, default {default})"
        if f.type == "bool" or isinstance(default, bool):
            # --no-X as well, so a flag can switch off what an env var switched on
            switch = parser.add_mutually_exclusive_group()
            switch.add_argument(
                flag_name(f.name),
                dest=f.name,
                action="store_const",
                const="true",
                default=None,
                help=help_text,
            )
            switch.add_argument(
                "--no-" + flag_name(f.name)[2:],
                dest=f.name,
                action="store_const",
                const="false",
                default=None,
                help=f"turn {flag_name(f.name)} off, whatever {env_name(f.name)} says",
            )
        else:
            metavar = "|".join(LOOP_NAMES) if f.name == "loop" else None
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=None, metavar=metavar, help=help_text
            )


def build_settings(
    flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge flags over env over defaults; raise SettingError naming the first bad setting."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = flags.get(f.name)
        source = flag_name(f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
            source = env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = _PARSERS[f.name](raw)
        except ValueError as exc:
            raise SettingError(f"invalid setting {source}: {exc}") from None
    settings = Settings(**values)
    if settings.lag_interval >= settings.stall_threshold:
        # the watchdog sees the loop turn only at lag ticks: a slower tick is a stall to it
        raise SettingError(
            f"invalid setting --lag-interval: must be below --stall-threshold"
            f" ({settings.stall_threshold:g}), got {settings.lag_interval:g}"
        )
    return settings
