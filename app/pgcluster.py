"""A throwaway PostgreSQL cluster from Debian's `postgresql` package, for tests and claims.

`initdb` in a temporary directory, one `postgres` process on 127.0.0.1 and a free port, trust
authentication, no fsync; stopped by its PID and deleted afterwards. PostgreSQL refuses to run as
root, so under root the server runs as the `postgres` system user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from app.launch import free_port

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class ClusterError(RuntimeError):
    """PostgreSQL's binaries are missing, or the cluster did not start or stop."""


def bin_dir() -> Path:
    """The newest Debian PostgreSQL's bin directory (initdb and postgres are not on PATH there)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise ClusterError("PostgreSQL is not installed (Debian: apt-get install postgresql)")


def _version(path: str) -> int:
    digits = Path(path).parent.parent.name
    return int(digits) if digits.isdigit() else 0


class Cluster:
    """One throwaway cluster; `start`/`stop` can repeat (same data, same port) to stage outages."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="looplab-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        subprocess.run(
            [self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync"],
            check=True,
            capture_output=True,
            cwd=self.dir,
            **self._as,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts a connection."""
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 (the child keeps it)
        with log:
            self.process = subprocess.Popen(
                [
                    self.bin / "postgres",
                    "-D",
                    self.data,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    self.dir,
                    "-c",
                    "fsync=off",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                **self._as,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ClusterError(f"postgres exited with {self.process.returncode}: {self.log()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"postgres not ready in {READY_TIMEOUT_S:.0f} s") from None
                time.sleep(0.05)  # polling readiness, not waiting a fixed time

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open connections are cut, as when a server goes down."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise ClusterError("postgres did not stop in time; killed") from None

    def log(self) -> str:
        try:
            return (self.dir / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A started cluster for the block; stopped and deleted afterwards, whatever happens."""
    cluster = Cluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def main(argv: list[str] | None = None) -> int:
    """`python -m app.pgcluster CMD...`: CMD with LOOP_LAB_DATABASE_URL naming a fresh cluster."""
    command = sys.argv[1:] if argv is None else argv
    if not command:
        print("usage: python -m app.pgcluster COMMAND [ARGS...]", file=sys.stderr)
        return 2
    with throwaway_cluster() as cluster:
        print(
            f"pgcluster: {cluster.url} (pid {cluster.process and cluster.process.pid})", flush=True
        )
        env = {**os.environ, "LOOP_LAB_DATABASE_URL": cluster.url}
        return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
