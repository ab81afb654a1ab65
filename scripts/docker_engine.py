"""A Docker engine for as long as a job needs one: the one that answers, or a dockerd started here.

    python -m scripts.docker_engine CMD [ARGS...]     runs CMD with an engine up, then stops
                                                      the dockerd it started (if it started one)

On Linux as root, a missing engine is installed (Debian's docker.io) and started with the flags this
kind of machine needs: no bridge, no iptables (containers use host networking), overlay2. The
dockerd started here is stopped by its pid at the end, also after a failure or a SIGTERM.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DOCKERD_FLAGS = ["--iptables=false", "--ip-forward=false", "--bridge=none"]
DOCKERD_LOG = Path("/var/log/loop-lab-dockerd.log")
START_TIMEOUT_S = 60.0
# what the jobs that use the engine run besides it
PACKAGES = [("dockerd", "docker.io"), ("docker-compose", "docker-compose")]
PACKAGES += [("debootstrap", "debootstrap")]

Log = Callable[[str], None]


def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _install(missing: list[str], log: Log) -> None:
    log(f"engine: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        if subprocess.run(argv, env=env, capture_output=True, check=False).returncode != 0:
            raise SystemExit(f"engine: `{' '.join(argv)}` failed")


@contextmanager
def docker_engine(log: Log = print) -> Iterator[int | None]:
    """The running engine, or a dockerd started here (its pid), stopped by that pid on exit."""
    if shutil.which("docker") and engine_answers():
        log("engine: using the Docker engine that answers `docker info`")
        yield None
        return
    if sys.platform != "linux" or os.geteuid() != 0:
        raise SystemExit(
            "no Docker engine answers `docker info`, and only root on Linux may start one"
        )
    if missing := [package for program, package in PACKAGES if not shutil.which(program)]:
        _install(missing, log)
    # overlay2 is far faster than vfs; no bridge and no iptables: containers use host networking
    argv = ["dockerd", *DOCKERD_FLAGS, "--storage-driver=overlay2"]
    with DOCKERD_LOG.open("ab") as out:
        dockerd = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not engine_answers():
            if dockerd.poll() is not None:
                tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-3:]
                raise SystemExit(f"dockerd exited {dockerd.returncode}: {' | '.join(tail)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"dockerd did not answer `docker info` in {START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        log(f"engine: started `{' '.join(argv)}` (pid {dockerd.pid}, log {DOCKERD_LOG})")
        yield dockerd.pid
    finally:
        dockerd.send_signal(signal.SIGTERM)
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait()
        log(f"engine: stopped dockerd (pid {dockerd.pid})")


def engine_nofile(pid: int | None) -> int:
    """The open-file hard limit containers inherit: dockerd's own (no CAP_SYS_RESOURCE here)."""
    if pid is None:
        found = subprocess.run(["pgrep", "-o", "-x", "dockerd"], capture_output=True, text=True)
        pid = int(found.stdout.split()[0]) if found.returncode == 0 else None
    if pid is not None:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[4])
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    # SIGTERM unwinds the `with`, so a dockerd started here is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with docker_engine() as _:
        return subprocess.run(argv, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
