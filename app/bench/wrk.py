"""wrk, the load generator for saturated throughput: faster than any Python server it measures.

Run pinned to its own CPU; its own CPU time comes back with the result, so a report can tell a
figure limited by the server from one limited by the generator.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed something that is not its summary."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_avg_ms: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int
    cpu_s: float = 0.0  # wrk's own user + system CPU, when run by run_wrk

    @property
    def clean(self) -> bool:
        """Every request answered with 2xx/3xx and no socket error: the rps means something."""
        return self.socket_errors == 0 and self.non_2xx == 0 and self.requests > 0


def _seconds(number: str, unit: str) -> float:
    return float(number) * _UNIT_S[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk's (4.x) summary: requests, duration, Requests/sec, latency, errors."""
    totals = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.MULTILINE)
    latency = re.search(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s", text, re.MULTILINE)
    if totals is None or rps is None or latency is None:
        raise WrkError(f"wrk output not understood:\n{text}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(totals.group(1)),
        duration_s=_seconds(totals.group(2), totals.group(3)),
        rps=float(rps.group(1)),
        latency_avg_ms=_seconds(latency.group(1), latency.group(2)) * 1000.0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run_wrk(
    url: str, *, duration_s: float, connections: int = 50, cpu: int | None = None
) -> WrkResult:
    """One wrk run (one thread), pinned to `cpu` if given; raises WrkError if it fails."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise WrkError("wrk not found (Debian package wrk)")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", url]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    # wait4 gives the child's own CPU time, which tells whether wrk was the bottleneck
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}:\n{out}")
    parsed = parse_wrk(out)
    return WrkResult(**{**parsed.__dict__, "cpu_s": usage.ru_utime + usage.ru_stime})
