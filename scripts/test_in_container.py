"""The test suite on another interpreter: a container of its Python image runs this checkout.

    python -m scripts.test_in_container 3.14 [pytest arguments]

The checkout is mounted read-only and copied in (without .venv and .git); the project is installed
with its test, load and bench extras into a fresh venv, and pytest runs all but the `host` tests
(those drive Chromium, Prometheus, PostgreSQL or Docker, which the Python images lack; the
default interpreter runs them).
pip's downloads are cached between runs. Where the image is missing and no registry answers, the
stand-in builder (scripts/standin_images.py) makes it from Debian packages. Needs a Docker engine
(`python -m scripts.docker_engine` starts one around it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from scripts.standin_images import Standin, build, cache_dir

ROOT = Path(__file__).resolve().parent.parent

# the Debian suite of the official python:X.Y-slim-SUITE image; where Debian ships that Python
OFFICIAL_SUITE = {"3.11": "bookworm", "3.12": "bookworm"}
DEBIAN_SUITE = {"3.11": "bookworm", "3.13": "trixie"}

IN_CONTAINER = """
set -eu
mkdir -p /work && cd /work
tar -C /src --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' -cf - . | tar -xf -
python -m venv /opt/venv
/opt/venv/bin/pip install --quiet --upgrade pip
/opt/venv/bin/pip install --quiet -e '.[test,load,bench]'
/opt/venv/bin/python -c 'import sys; print("suite on Python", sys.version.split()[0])'
exec /opt/venv/bin/python -m pytest -p no:cacheprovider -m 'not host' "$@"
"""


def image_for(python: str) -> str:
    """python:X.Y-slim-SUITE, made from Debian packages first if the engine does not have it."""
    name = f"python:{python}-slim-{OFFICIAL_SUITE.get(python, 'trixie')}"
    found = subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False)
    if found.returncode != 0:
        build(Standin(DEBIAN_SUITE.get(python, "sid"), python), [name])
    return name


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="interpreter version, e.g. 3.14")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest")
    args = parser.parse_args(argv)
    image = image_for(args.python)
    pip_cache = cache_dir() / f"pip-py{args.python}"
    pip_cache.mkdir(parents=True, exist_ok=True)
    name = f"looplab-test-py{args.python}"
    command = ["docker", "run", "--rm", "--network", "host", "--name", name]
    command += ["-v", f"{ROOT}:/src:ro", "-v", f"{pip_cache}:/root/.cache/pip"]
    command += ["-e", "PYTHONDONTWRITEBYTECODE=1", "-e", f"CI={os.environ.get('CI', '')}"]
    command += [image, "bash", "-c", IN_CONTAINER, "suite", *args.pytest_args]
    started = time.monotonic()
    print(f"test_in_container: the suite on {image}", flush=True)
    code = subprocess.run(command, check=False).returncode
    took = time.monotonic() - started
    print(f"test_in_container: Python {args.python} exit {code} in {took:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
