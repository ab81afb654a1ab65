"""What every loop-lab scenario shares: the users, their options, a keep-alive fix, a sample log.

Each scenario file imports only the user classes it runs (locust runs every concrete User class it
finds in the locustfile's namespace).

Keep-alive past fd 1024. Before reusing an idle keep-alive socket, geventhttpclient asks
`select.select([sock], [], [], 0)` whether it is readable (readable while idle = the server closed
it). select() takes a fixed-size bitmap of 1024 descriptors, so for fd >= 1024 Python raises
`ValueError: filedescriptor out of range in select()`; the pool catches it, decides the socket is
dead, closes it and opens a new connection: silently, on every request of every user whose socket
landed above 1023, which at 10,000 users is nearly all of them. poll() takes a list of descriptors
and has no such ceiling, so `_is_socket_alive` is replaced by the same question asked with poll().
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import gevent
from gevent import monkey
from geventhttpclient import connectionpool
from locust import FastHttpUser, LoadTestShape, User, constant, constant_pacing, task
from locust import events as _locust_events
from locust import runners as _locust_runners

log = logging.getLogger("loop_lab.loadtest")
events: Any = _locust_events  # locust's EventHook methods are untyped

LIVENESS_ENV = "LOOP_LAB_LOCUST_LIVENESS"  # "poll" (default) or "select" (upstream: the trap)
FD_FLOOR_ENV = "LOOP_LAB_LOCUST_FD_FLOOR"  # park descriptors so every socket gets fd >= this
SOURCES_ENV = "LOOP_LAB_LOCUST_SOURCES"  # comma-separated 127.0.0.x addresses to connect from
SAMPLES_ENV = "LOOP_LAB_SAMPLES_DIR"  # where each process logs every request (the bench reads it)

PROBE_NAME = "/healthz (probe)"
NETWORK_TIMEOUT_S = 60.0  # FastHttpUser's default; longer delays get twice theirs + 30 s
PHASE_MESSAGE = "looplab_phase"

# user classes a phased scenario has switched on; None = not phased, every user always active
_active_now: frozenset[str] | None = None

# locust monkey-patches `select`; the liveness check wants the real, non-yielding poll()
_real_poll: Callable[[], Any] = monkey.get_original("select", "poll")
_upstream_is_socket_alive = connectionpool.ConnectionPool._is_socket_alive


def socket_is_reusable(sock: Any) -> bool:
    """True if an idle keep-alive socket has nothing to read and no error/hang-up pending."""
    if sock is None:
        return False
    try:
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = _real_poll()
        # POLLERR, POLLHUP and POLLNVAL are always reported; any event at all means "do not reuse"
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _poll_is_socket_alive(_pool: connectionpool.ConnectionPool, sock: Any | None) -> bool:
    return socket_is_reusable(sock)


def install_liveness_check(mode: str | None = None) -> str:
    """Make geventhttpclient check idle sockets with poll() (default) or keep its select() check."""
    mode = mode if mode is not None else os.environ.get(LIVENESS_ENV, "poll")
    if mode not in ("poll", "select"):
        raise ValueError(f"{LIVENESS_ENV} must be poll or select, got {mode!r}")
    check = _poll_is_socket_alive if mode == "poll" else _upstream_is_socket_alive
    # replacing the method on the class covers every pool, SSL pools included
    connectionpool.ConnectionPool._is_socket_alive = check  # type: ignore[method-assign,assignment]
    return mode


LIVENESS_CHECK = install_liveness_check()

# A locust worker that misses 3 one-second heartbeats is "missing", and when every worker is, the
# master stops the test and starts it again (users respawned, connections reopened). A worker busy
# creating thousands of users on a shared 2-core machine can be late by more than 3 s without
# being gone: give it 30 s. (The master reads this module constant at each heartbeat.)
HEARTBEAT_LIVENESS = 30
_locust_runners.HEARTBEAT_LIVENESS = HEARTBEAT_LIVENESS

# descriptors held open so that sockets opened later get high numbers (see FD_FLOOR_ENV)
_parked_fds: list[int] = []


def park_low_fds(floor: int) -> int:
    """Hold /dev/null open until the next free descriptor is >= floor; return that descriptor.

    A few hundred users then reproduce the fd range of 10,000 users, select() trap included.
    """
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        if fd >= floor:
            os.close(fd)
            return fd
        _parked_fds.append(fd)


# Linux: bind() picks only the address; the port is chosen at connect() per 4-tuple
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class SourceSpread:
    """Binds each new client socket to the next of several loopback source addresses.

    One source/destination pair has only the ephemeral port range (28,232 ports by default);
    spreading 100,000 users over a few 127.0.0.x sources gives each its own range, with nothing
    on the machine changed (no sysctl). IP_BIND_ADDRESS_NO_PORT leaves the port to connect(),
    which may reuse a port another source/destination pair already holds.
    """

    def __init__(self, sources: Sequence[str]) -> None:
        self.sources = tuple(sources)
        self._next = 0

    def bind(self, sock: Any) -> None:
        address = self.sources[self._next % len(self.sources)]
        self._next += 1
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((address, 0))


_upstream_create_tcp_socket = connectionpool.ConnectionPool._create_tcp_socket


def install_source_spread(sources: Sequence[str]) -> SourceSpread:
    spread = SourceSpread(sources)

    def create_tcp_socket(
        pool: connectionpool.ConnectionPool, family: int, socktype: int, protocol: int
    ) -> Any:
        sock = _upstream_create_tcp_socket(pool, family, socktype, protocol)
        if family == socket.AF_INET:
            spread.bind(sock)
        return sock

    connectionpool.ConnectionPool._create_tcp_socket = create_tcp_socket  # type: ignore[method-assign,assignment]
    return spread


if os.environ.get(SOURCES_ENV):
    install_source_spread([a for a in os.environ[SOURCES_ENV].split(",") if a])

if os.environ.get(FD_FLOOR_ENV):
    park_low_fds(int(os.environ[FD_FLOOR_ENV]))


class SampleLog:
    """Appends `end_epoch<TAB>name<TAB>ms<TAB>failed` per request to one file per process.

    locust rounds response times above 10 s to whole seconds, too coarse to check a 3% overhead
    target on a 10 s request, so the bench computes percentiles from this exact log instead.
    The file is opened lazily, after `--processes` has forked, so each worker writes its own.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._file: IO[str] | None = None
        self._pid = 0
        self._last_flush = 0.0

    def _open(self) -> IO[str]:
        if self._file is None or self._pid != os.getpid():
            self._pid = os.getpid()
            path = os.path.join(self.directory, f"samples-{self._pid}.tsv")
            self._file = open(path, "a", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115
        return self._file

    def record(
        self,
        name: str,
        response_time: float,
        exception: BaseException | None = None,
        start_time: float | None = None,
        **_: Any,
    ) -> None:
        now = time.time()
        end = now if start_time is None else start_time + response_time / 1000.0
        f = self._open()
        f.write(f"{end:.4f}\t{name}\t{response_time:.3f}\t{0 if exception is None else 1}\n")
        if now - self._last_flush > 1.0:  # keep the file close to live without a write per line
            self._last_flush = now
            f.flush()

    def flush(self, **_: Any) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.flush()


if os.environ.get(SAMPLES_ENV):
    _samples = SampleLog(os.environ[SAMPLES_ENV])
    events.request.add_listener(_samples.record)
    events.test_stop.add_listener(_samples.flush)
    events.quitting.add_listener(_samples.flush)
    atexit.register(_samples.flush)


def _add_options(parser: Any, **_: Any) -> None:
    parser.add_argument(
        "--delay", type=float, default=1.0, help="seconds each /await request waits (loop-lab)"
    )
    parser.add_argument(
        "--block", type=float, default=0.2, help="seconds each /block or /offload request holds"
    )
    parser.add_argument("--blockers", type=int, default=2, help="users sending /block or /offload")
    parser.add_argument(
        "--block-every", type=float, default=1.0, help="seconds between one blocker's requests"
    )
    parser.add_argument("--probe-rate", type=float, default=10.0, help="/healthz probes a second")
    parser.add_argument(
        "--cpu-units", type=int, default=2_000_000, help="work units per /cpu request"
    )
    parser.add_argument("--json-kb", type=int, default=4096, help="KB per /json document")


def _on_phase(msg: Any, **_: Any) -> None:
    global _active_now
    _active_now = frozenset(msg.data["active"])


def is_active(user: User) -> bool:
    """Whether a gated user should send requests now (always, outside phased scenarios)."""
    return _active_now is None or type(user).__name__ in _active_now


def _announce(environment: Any, **_: Any) -> None:
    if environment.runner is not None:
        environment.runner.register_message(PHASE_MESSAGE, _on_phase)
    options = environment.parsed_options
    if options is not None:
        paced: tuple[type[User], ...] = (
            BlockUser,
            OffloadUser,
            CpuInlineUser,
            CpuThreadUser,
            CpuProcessUser,
            *REALWORLD_USERS,
        )
        for user_class in paced:
            user_class.fixed_count = options.blockers
        # FastHttpUser's read timeout is 60 s: a 60 s /await would fail as it completes
        LoopLabUser.network_timeout = max(NETWORK_TIMEOUT_S, 2 * options.delay + 30)
    log.info(
        "loop-lab users: keep-alive liveness check=%s, fd floor=%s, sources=%s",
        LIVENESS_CHECK,
        os.environ.get(FD_FLOOR_ENV, "none"),
        os.environ.get(SOURCES_ENV, "default"),
    )


events.init_command_line_parser.add_listener(_add_options)
events.init.add_listener(_announce)


def options_of(user: FastHttpUser) -> Any:
    return user.environment.parsed_options


class LoopLabUser(FastHttpUser):
    """One user = one greenlet = one keep-alive connection, reused for every request it sends."""

    abstract = True
    concurrency = 1


class AwaitUser(LoopLabUser):
    """The crowd: every user keeps one request parked in `await asyncio.sleep(delay)`."""

    wait_time = constant(0)

    def on_start(self) -> None:
        # locust starts each second's users all at once; with no pause between requests those
        # cohorts would stay in lockstep and hit the server as waves of thousands of requests.
        # A random start within one delay spreads them evenly over the cycle for the whole run.
        gevent.sleep(random.random() * options_of(self).delay)

    @task
    def wait_on_server(self) -> None:
        self.client.get(f"/await?delay={options_of(self).delay:g}", name="/await")


class ProbeUser(LoopLabUser):
    """A light probe on /healthz: its latency is how long the loop takes to get to anyone."""

    fixed_count = 1

    def wait_time(self) -> float:
        pacing: float = constant_pacing(1.0 / options_of(self).probe_rate)(self)
        return pacing

    @task
    def probe(self) -> None:
        self.client.get("/healthz", name=PROBE_NAME)


class _PacedBlocker(LoopLabUser):
    """Sends one request every --block-every seconds, while its phase (if any) is on."""

    abstract = True
    idle_poll_s = 0.1

    def wait_time(self) -> float:
        if not is_active(self):
            return self.idle_poll_s
        pacing: float = constant_pacing(options_of(self).block_every)(self)
        return pacing


class BlockUser(_PacedBlocker):
    """A blocker: /block runs time.sleep(block) on the loop thread, so nobody else is served."""

    @task
    def block_loop(self) -> None:
        if not is_active(self):
            return
        self.client.get(f"/block?delay={options_of(self).block:g}", name="/block")


class OffloadUser(_PacedBlocker):
    """The same blocking call moved to the thread pool with run_in_executor."""

    @task
    def offload(self) -> None:
        if not is_active(self):
            return
        self.client.get(f"/offload?delay={options_of(self).block:g}&pool=thread", name="/offload")


class _CpuUser(_PacedBlocker):
    abstract = True
    via = "inline"

    @task
    def burn(self) -> None:
        if not is_active(self):
            return
        units = options_of(self).cpu_units
        self.client.get(f"/cpu?n={units}&via={self.via}", name=f"/cpu {self.via}")


class CpuInlineUser(_CpuUser):
    """CPU work on the loop thread: blocks the loop for as long as it computes."""

    via = "inline"


class CpuThreadUser(_CpuUser):
    """CPU work in a thread: off the loop, but it still holds the GIL the loop needs."""

    via = "thread"


class CpuProcessUser(_CpuUser):
    """CPU work in a process: its own interpreter and GIL, so the loop stays free."""

    via = "process"


class _RealWorldUser(_PacedBlocker):
    """One form of a real loop killer (realworld): `target` with {block} and {kb} filled in."""

    abstract = True
    target: ClassVar[str] = ""
    label: ClassVar[str] = ""

    @task
    def call(self) -> None:
        if not is_active(self):
            return
        options = options_of(self)
        path = self.target.format(block=f"{options.block:g}", kb=options.json_kb)
        self.client.get(path, name=self.label)


def _realworld_user(name: str, target: str, label: str, doc: str) -> type[_RealWorldUser]:
    """A concrete `_RealWorldUser` named `name` (locust runs it, phases switch it by that name)."""
    attrs = {"__doc__": doc, "__module__": __name__, "target": target, "label": label}
    return type(name, (_RealWorldUser,), {**attrs, "abstract": False})


# one line per form: its class, the request it sends, the name locust reports it under
DbSyncUser = _realworld_user(
    "DbSyncUser",
    "/db?driver=sync&delay={block}",
    "/db sync",
    "A blocking database driver on the loop (sqlite3, or psycopg with --database-url).",
)
DbOffloadUser = _realworld_user(
    "DbOffloadUser",
    "/db?driver=offload&delay={block}",
    "/db offload",
    "The same blocking driver in the thread pool.",
)
DbAsyncUser = _realworld_user(
    "DbAsyncUser",
    "/db?driver=async&delay={block}",
    "/db async",
    "An async driver (aiosqlite, or psycopg's async connections).",
)
UpstreamRequestsUser = _realworld_user(
    "UpstreamRequestsUser",
    "/upstream?client=requests&delay={block}",
    "/upstream requests",
    "`requests` on the loop, calling a slow upstream.",
)
UpstreamAiohttpUser = _realworld_user(
    "UpstreamAiohttpUser",
    "/upstream?client=aiohttp&delay={block}",
    "/upstream aiohttp",
    "The same call with the app's aiohttp.ClientSession.",
)
JsonInlineUser = _realworld_user(
    "JsonInlineUser",
    "/json?kb={kb}&via=inline",
    "/json inline",
    "json.dumps of a large document on the loop.",
)
JsonProcessUser = _realworld_user(
    "JsonProcessUser",
    "/json?kb={kb}&via=process",
    "/json process",
    "The same serialisation in the process pool.",
)

REALWORLD_USERS: tuple[type[_RealWorldUser], ...] = (
    DbSyncUser,
    DbOffloadUser,
    DbAsyncUser,
    UpstreamRequestsUser,
    UpstreamAiohttpUser,
    JsonInlineUser,
    JsonProcessUser,
)


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the whole run
    active: tuple[type[User], ...] = ()  # gated users that send requests in this phase


class PhasedShape(LoadTestShape):
    """Walks through phases at a constant user count; each phase switches some users on or off.

    Every user class of the locustfile runs from the start (the crowd, the probe, fixed counts of
    gated users), so the crowd's connections stay open throughout; a gated user sends requests
    only while the current phase lists it. The shape tells every process the phase with a custom
    message (locust's own per-stage user classes only affect users it spawns later).

    Reads -u/-r/-t (use_common_options); without -t (the web UI) each phase lasts 30 s. Each phase
    change is logged and, under the bench, appended to `phases.tsv` so plots can mark it.
    """

    abstract = True
    use_common_options = True
    phases: ClassVar[Sequence[Phase]] = ()
    default_phase_s: ClassVar[float] = 30.0

    _current: str | None = None

    def options(self) -> Any:
        return self.runner.environment.parsed_options if self.runner is not None else None

    def total_s(self) -> float:
        run_time = getattr(self.options(), "run_time", None)
        return float(run_time) if run_time else self.default_phase_s * len(self.phases)

    def phase_at(self, elapsed: float) -> Phase | None:
        edge = 0.0
        total = self.total_s()
        for phase in self.phases:
            edge += phase.share * total
            if elapsed < edge:
                return phase
        return None

    def tick(self) -> tuple[int, float] | None:
        phase = self.phase_at(time.perf_counter() - self.start_time)
        if phase is None:
            return None
        if phase.name != self._current:
            self._current = phase.name
            self.announce(phase)
        options = self.options()
        users = int(getattr(options, "num_users", None) or 100)
        rate = float(getattr(options, "spawn_rate", None) or users)
        return users, rate

    def announce(self, phase: Phase) -> None:
        log.info("loop-lab phase: %s", phase.name)
        if os.environ.get(SAMPLES_ENV):
            path = os.path.join(os.environ[SAMPLES_ENV], "phases.tsv")
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{time.time():.3f}\t{phase.name}\n")
        names = [user_class.__name__ for user_class in phase.active]
        if self.runner is not None:  # to every worker, or to this process when running alone
            self.runner.send_message(PHASE_MESSAGE, {"phase": phase.name, "active": names})
