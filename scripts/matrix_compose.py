"""`loop-lab matrix` through docker-compose's `matrix` profile, as a user runs it, on this engine.

    python -m scripts.matrix_compose [--out DIR] [loop-lab matrix options...]

The profile never makes stand-ins (on a user's machine `docker build` pulls the official python
images). Here no registry answers, so the interpreters' base images are first made from Debian
packages on the host; then the matrix image is built and the profile's service runs with the
given options, writing DIR/matrix.json, matrix.md and plots. Starts an engine if none answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from app.bench.matrix import PYTHONS, ensure_bases
from app.bench.results import source_version
from scripts.compose_test import REPO, Stack, build_env
from scripts.docker_engine import docker_engine, engine_nofile

MATRIX_IMAGE_PYTHON = "3.11"  # the Dockerfile's default PYTHON_IMAGE, which the matrix image uses


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/matrix"))
    parser.add_argument("--pythons", default=",".join(PYTHONS))
    args, matrix_args = parser.parse_known_args(argv)
    pythons = [p.strip() for p in args.pythons.split(",") if p.strip()]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with docker_engine() as pid, tempfile.TemporaryDirectory(prefix="matrix-compose-") as tmp:
        for python in dict.fromkeys([MATRIX_IMAGE_PYTHON, *pythons]):
            ensure_bases(python, REPO)
        build = ["docker", "build", "--quiet", "--network", "host", "--target", "matrix"]
        build += ["-t", "loop-lab:matrix", str(REPO)]
        print("matrix-compose: building loop-lab:matrix", flush=True)
        subprocess.run(build, env=build_env(), check=True, stdout=subprocess.DEVNULL)
        # the engine's own hard limit caps what a container may ask for (docs/compose.md)
        env = {**os.environ, "NOFILE": str(min(65536, engine_nofile(pid))), "RESULTS_DIR": str(out)}
        env["LOOP_LAB_SOURCE"] = source_version() or ""
        stack = Stack(Path(tmp), env, project="looplab-matrix")
        command = ["loop-lab", "matrix", f"--pythons={','.join(pythons)}", "--context=/src"]
        command += ["--no-standins", "--out=/results", *matrix_args]
        done = stack.run_service("matrix", command, profile="matrix")
    return done


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
