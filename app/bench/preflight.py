"""Before a bench starts: can the machine hold the asked-for users, and how to lay them out.

Checks the limits that end a large run halfway (file descriptors per process, ephemeral ports per
source/destination pair, memory) against the users and server workers asked for, and sizes what
the bench starts: locust worker processes (each below the fd limit), the server's
`--max-connections` (from its real fd limit), and the loopback source addresses the users connect
from (each address has its own ephemeral port range towards the server). A size that cannot fit
is refused with one message naming the limit and what to do. Nothing on the machine is changed.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from app.guard import fd_reserve
from app.server import somaxconn

# Measured figures this plan rests on (docs/benchmarks.md says where each was measured):
# server RSS per connection under `loop-lab bench`: 12.4-13.4 KB ("Scaling with concurrency"),
# 11.2-11.8 KB at 19,000 ("To the limits"); the highest, rounded up
SERVER_KB_PER_CONNECTION = 13.5
# locust (FastHttpUser) RSS per user, master + workers, bases included: 32.5-33.2 KB at 19,000
# users in 2 processes, 39.2 KB in 4 ("To the limits"); the highest, rounded up
LOCUST_KB_PER_USER = 40.0
# CPU per request at 19,000 users and 10 s delay on a quiet machine ("To the limits"): server
# 0.16-0.18 ms, locust 0.36-0.41 ms; the higher of each (a shared machine measured 2-3x these)
SERVER_CPU_MS_PER_REQUEST = 0.18
LOCUST_CPU_MS_PER_REQUEST = 0.41
PROCESS_BASE_MB = 60.0  # one idle server worker (57.7 MB) or locust process ("To the limits")
SERVER_FDS_AT_START = 64  # listening socket, pools, pipes, logs: the fds a server holds idle
LOCUST_FDS_AT_START = 128  # locust's own files, zmq sockets to the master, pipes
LOCUST_FD_SHARE = 0.9  # users per locust process stay below this share of its fd limit
IMBALANCE = 1.10  # SO_REUSEPORT hashes connections; no worker gets more than this x its share
PORT_SHARE = 0.9  # users per source address stay below this share of the ephemeral range
MEMORY_SHARE = 0.8  # the run may plan for at most this share of MemAvailable
FIRST_SOURCE = IPv4Address("127.0.0.1")
MAX_SOURCES = 250  # 127.0.0.1 .. 127.0.0.250


class PreflightError(ValueError):
    """The machine cannot hold the asked-for run; the message names the limit and the fix."""


@dataclass(frozen=True)
class Machine:
    """The limits read from the kernel (one place, so a test can give its own)."""

    nofile_hard: int
    nofile_soft: int
    port_range: tuple[int, int]
    somaxconn: int | None
    mem_available_mb: float
    cpus: int
    time_wait: int
    listen_drops: int = 0  # TcpExt ListenDrops since boot: SYNs dropped on a full backlog

    @property
    def ports(self) -> int:
        return self.port_range[1] - self.port_range[0] + 1

    @classmethod
    def read(cls) -> Machine:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        return cls(
            nofile_hard=int(hard),
            nofile_soft=int(soft if soft != resource.RLIM_INFINITY else hard),
            port_range=_port_range(),
            somaxconn=somaxconn(),
            mem_available_mb=_mem_available_mb(),
            cpus=os.cpu_count() or 1,
            time_wait=_time_wait(),
            listen_drops=_tcp_ext("ListenDrops"),
        )


def _port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            lo, hi = (int(part) for part in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _mem_available_mb() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) / 2**20


def _time_wait() -> int:
    """Sockets in TIME_WAIT now (/proc/net/sockstat's `tw`): they hold their ports a while."""
    try:
        with open("/proc/net/sockstat", encoding="ascii") as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    return int(parts[parts.index("tw") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tcp_ext(name: str) -> int:
    """A TcpExt counter of /proc/net/netstat (a header line of names, then one of values)."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            table = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            return int(table.get(name, 0))
    return 0


def server_max_connections(nofile: int) -> int:
    """Connections one server process can hold under an fd limit: minus its reserve and idle fds."""
    return max(1, nofile - fd_reserve(nofile) - SERVER_FDS_AT_START)


def fewest_workers(users: int, machine: Machine | None = None) -> int:
    """The fewest server processes whose fd limits hold `users` connections between them."""
    capacity = server_max_connections((machine or Machine.read()).nofile_hard)
    workers = 1
    while _per_worker(users, workers) > capacity:
        workers += 1
    return workers


def _per_worker(users: int, workers: int) -> int:
    """The most connections one of `workers` processes may get (+2: the bench's /stats readers)."""
    return math.ceil(users * (IMBALANCE if workers > 1 else 1.0) / workers) + 2


def locust_users_per_process(nofile: int) -> int:
    return max(1, int(LOCUST_FD_SHARE * nofile) - LOCUST_FDS_AT_START)


def users_per_source(ports: int) -> int:
    return max(1, int(PORT_SHARE * ports))


@dataclass(frozen=True)
class Plan:
    """What the bench starts for a size the machine can hold, and why."""

    users: int
    workers: int
    locust_processes: int
    max_connections: int  # per server worker, from its fd limit
    sources: tuple[str, ...]  # loopback addresses the users connect from (none: the default)
    memory_mb: float  # planned RSS: servers + load generator
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "workers": self.workers,
            "locust_processes": self.locust_processes,
            "max_connections_per_worker": self.max_connections,
            "sources": list(self.sources),
            "memory_mb_planned": round(self.memory_mb),
            "notes": list(self.notes),
            # the bench spreads users over source addresses instead of widening the port range
            "machine_changes": [],
        }


def _n(value: float) -> str:
    return f"{value:,.0f}"


def plan_run(
    users: int,
    *,
    workers: int = 1,
    processes: int | None = None,
    auto_processes: int = 1,
    local_target: bool = True,
    sources: int = 0,
    rate: float | None = None,
    machine: Machine | None = None,
) -> Plan:
    """The layout for `users` over `workers` server processes, or PreflightError naming the limit.

    `auto_processes` is the locust process count the CPU alone would ask for; the plan raises it
    until every process stays below its fd limit. `local_target`: the server is on loopback (the
    users can then connect from several 127.0.0.x addresses). `sources`: at least this many
    source addresses (0: as many as the ephemeral ports need). `rate`: the requests/s the
    scenario asks for (users / delay), for a note when it needs more CPU than the machine has.
    """
    m = machine or Machine.read()
    nofile = m.nofile_hard
    notes: list[str] = []
    max_connections = server_max_connections(nofile)
    if local_target:
        per_worker = _per_worker(users, workers)
        if per_worker > max_connections:
            needed = fewest_workers(users, m)
            raise PreflightError(
                f"{_n(users)} users over {workers} server process(es) is up to "
                f"{_n(per_worker)} connections per process, but a process may hold "
                f"{_n(nofile)} file descriptors (RLIMIT_NOFILE hard limit), which leaves room for "
                f"{_n(max_connections)} connections: use --workers {needed} or more, or raise "
                "the hard limit (ulimit -Hn as root, or docker's ulimits: nofile)"
            )
    per_locust = locust_users_per_process(nofile)
    fd_processes = math.ceil(users / per_locust)
    if processes is not None and processes < fd_processes:
        raise PreflightError(
            f"{_n(users)} users over {processes} locust process(es) is "
            f"{_n(math.ceil(users / processes))} sockets per process, but a process may hold "
            f"{_n(nofile)} file descriptors (RLIMIT_NOFILE hard limit): use --processes "
            f"{fd_processes} or more (or leave --processes out and the bench sizes it)"
        )
    locust_processes = processes if processes is not None else max(auto_processes, fd_processes)
    if locust_processes > 1 and fd_processes > auto_processes and processes is None:
        notes.append(
            f"{locust_processes} locust processes so that none holds more than "
            f"{_n(per_locust)} sockets (fd limit {_n(nofile)})"
        )
    per_source = users_per_source(m.ports)
    n_sources = max(math.ceil(users / per_source), sources if local_target else 1)
    if n_sources > 1 and not local_target:
        raise PreflightError(
            f"{_n(users)} users to one address and port need {_n(users)} ephemeral ports, but "
            f"a source/destination pair has {_n(m.ports)} ({m.port_range[0]}-{m.port_range[1]}, "
            "net.ipv4.ip_local_port_range): bench a loopback server (no --target) so users can "
            f"connect from several 127.0.0.x addresses, or use at most {_n(per_source)} users"
        )
    if n_sources > MAX_SOURCES:
        raise PreflightError(
            f"{_n(users)} users need {n_sources} loopback source addresses of {_n(m.ports)} "
            f"ephemeral ports each; the bench uses at most {MAX_SOURCES}: ask for fewer users"
        )
    addresses = tuple(str(FIRST_SOURCE + i) for i in range(n_sources)) if n_sources > 1 else ()
    if n_sources > 1:
        notes.append(
            f"users connect from {n_sources} loopback addresses ({addresses[0]}-{addresses[-1]}): "
            f"{_n(m.ports)} ephemeral ports per source/destination pair"
        )
    server_mb = users * SERVER_KB_PER_CONNECTION / 1024 + workers * PROCESS_BASE_MB
    locust_mb = users * LOCUST_KB_PER_USER / 1024 + (locust_processes + 1) * PROCESS_BASE_MB
    memory_mb = (server_mb if local_target else 0.0) + locust_mb
    if memory_mb > MEMORY_SHARE * m.mem_available_mb:
        raise PreflightError(
            f"{_n(users)} users need about {_n(memory_mb)} MB (server {_n(server_mb)} MB at "
            f"{SERVER_KB_PER_CONNECTION:g} KB per connection, locust {_n(locust_mb)} MB at "
            f"{LOCUST_KB_PER_USER:g} KB per user, as measured in docs/benchmarks.md), but only "
            f"{_n(m.mem_available_mb)} MB is available: ask for fewer users or free memory"
        )
    if rate:
        cores = rate * (SERVER_CPU_MS_PER_REQUEST + LOCUST_CPU_MS_PER_REQUEST) / 1000.0
        if cores > 0.5 * m.cpus:
            notes.append(
                f"{_n(rate)} requests/s need about {cores:.1f} cores (server "
                f"{SERVER_CPU_MS_PER_REQUEST:g} ms + locust {LOCUST_CPU_MS_PER_REQUEST:g} ms per "
                f"request, as measured in docs/benchmarks.md) of the {m.cpus} here: the loop lag "
                "will be the machine's; a longer --delay lowers the rate"
            )
    if m.somaxconn is not None and m.somaxconn < 4096:
        notes.append(
            f"net.core.somaxconn is {m.somaxconn}: the listen backlog is capped there, a fast "
            "ramp may see SYN retransmits (1 s, 3 s) as latency"
        )
    if m.time_wait > 1000:
        notes.append(f"{_n(m.time_wait)} sockets in TIME_WAIT before the run")
    return Plan(
        users=users,
        workers=workers,
        locust_processes=locust_processes,
        max_connections=max_connections,
        sources=addresses,
        memory_mb=memory_mb,
        notes=tuple(notes),
    )
