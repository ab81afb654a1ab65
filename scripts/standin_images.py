"""Stand-ins for official images (python, postgres), built from Debian packages where no registry
answers.

debootstrap makes a minimal Debian rootfs with the suite's Python and venv, `docker import` turns it
into an image under the names given (e.g. python:3.11-slim-bookworm). The rootfs tarball and the
downloaded .debs are cached, so a second build costs only the import. Usage:
    python scripts/standin_images.py --suite bookworm --python 3.11 python:3.11-slim-bookworm ...
    python scripts/standin_images.py --postgres postgres:16
Needs root (debootstrap) and a running Docker engine. The mirror comes from the host's apt sources.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the suite's own python3 where it is that version; sid carries several
DEFAULT_PYTHON = {"bookworm": "3.11", "trixie": "3.13", "sid": "3.14"}
OFFICIAL_NAME = re.compile(r"^python:(?P<python>3\.\d+)(?:-slim)?-(?P<suite>[a-z]+)$")


def cache_dir() -> Path:
    """A cache that survives between runs: /var/cache/loop-lab as root, else ~/.cache/loop-lab."""
    if env := os.environ.get("LOOP_LAB_CACHE"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/loop-lab")
    return Path.home() / ".cache" / "loop-lab"


def mirror(sources: Path = SOURCES) -> str:
    """The first `URIs:` of the host's deb822 apt sources: the mirror this machine may use."""
    for line in sources.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    raise SystemExit(f"no URIs: line in {sources}")


@dataclass(frozen=True)
class Standin:
    """One Debian suite with one Python version: what goes into the rootfs."""

    suite: str
    python: str

    @classmethod
    def for_image(cls, name: str) -> Standin:
        """The suite and Python an official image name stands for (python:3.11-slim-bookworm)."""
        match = OFFICIAL_NAME.match(name)
        if not match:
            raise SystemExit(f"{name}: not a python:X.Y[-slim]-SUITE name; give --suite/--python")
        return cls(match["suite"], match["python"])

    @property
    def packages(self) -> list[str]:
        # python3-venv alongside: debootstrap fails to configure a lone pythonX.Y-venv
        exe = f"python{self.python}"
        return ["ca-certificates", "python3", "python3-venv", exe, f"{exe}-venv"]

    @property
    def key(self) -> str:
        return f"{self.suite}-py{self.python}"


@dataclass(frozen=True)
class PostgresStandin(Standin):
    """Debian's postgresql (15 in bookworm), its entrypoint reading the official image's env."""

    python: str = ""

    @property
    def packages(self) -> list[str]:
        return ["postgresql"]

    @property
    def key(self) -> str:
        return f"{self.suite}-postgres"


# What the official postgres image's entrypoint does with its env, in a few lines of sh: a new
# cluster owned by POSTGRES_USER (password POSTGRES_PASSWORD), the database POSTGRES_DB, then the
# server in the foreground listening on every address (a `-c listen_addresses=...` narrows it).
POSTGRES_ENTRYPOINT = """#!/bin/sh
set -eu
if [ "${1:-postgres}" = postgres ]; then
    [ $# -gt 0 ] && shift
    : "${POSTGRES_USER:=postgres}"
    : "${POSTGRES_DB:=$POSTGRES_USER}"
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        pwfile=$(mktemp)
        printf '%s\n' "${POSTGRES_PASSWORD:?the postgres image needs POSTGRES_PASSWORD}" >"$pwfile"
        initdb -U "$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
            --auth-host=scram-sha-256 >/dev/null
        rm -f "$pwfile"
        echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
        echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
        if [ "$POSTGRES_DB" != postgres ]; then
            pg_ctl -w -o "-c listen_addresses=''" start >/dev/null
            psql -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
            pg_ctl -w stop >/dev/null
        fi
    fi
    exec postgres "$@"
fi
exec "$@"
"""


def _prepare_postgres(root: Path) -> list[str]:
    """Entrypoint, data and socket directories owned by postgres; the image's --change lines."""
    (version,) = [p.name for p in (root / "usr/lib/postgresql").iterdir()]
    # the package's own cluster (created by its postinst) is not the image's
    shutil.rmtree(root / "var/lib/postgresql" / version, ignore_errors=True)
    shutil.rmtree(root / "etc/postgresql" / version, ignore_errors=True)
    # JIT's LLVM is 130 MB of the rootfs; without its provider library postgres runs without JIT
    shutil.rmtree(root / "usr/lib/postgresql" / version / "lib/bitcode", ignore_errors=True)
    for pattern in ("usr/lib/postgresql/*/lib/llvmjit*", "usr/lib/*/libLLVM*", "usr/lib/*/libz3*"):
        for path in root.glob(pattern):
            path.unlink()
    entrypoint = root / "usr/local/bin/docker-entrypoint.sh"
    entrypoint.write_text(POSTGRES_ENTRYPOINT)
    entrypoint.chmod(0o755)
    passwd = (root / "etc/passwd").read_text().splitlines()
    uid, gid = next(
        map(int, line.split(":")[2:4]) for line in passwd if line.startswith("postgres:")
    )
    for directory in ("var/lib/postgresql/data", "var/run/postgresql"):
        (root / directory).mkdir(parents=True, exist_ok=True)
        os.chown(root / directory, uid, gid)
    (root / "var/lib/postgresql/data").chmod(0o700)
    return [
        f"ENV PATH=/usr/lib/postgresql/{version}/bin:{STD_PATH}",
        "ENV PGDATA=/var/lib/postgresql/data",
        "USER postgres",
        "EXPOSE 5432",
        'ENTRYPOINT ["docker-entrypoint.sh"]',
        'CMD ["postgres"]',
    ]


def run(argv: list[str], **kwargs: object) -> None:
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def rootfs_tarball(standin: Standin, cache: Path) -> tuple[Path, bool]:
    """The cached rootfs tarball (its image settings beside it in .changes), debootstrapped first
    if absent; True when it was built now."""
    tarball = cache / f"rootfs-{standin.key}.tar"
    if tarball.exists() and tarball.with_suffix(".changes").exists():
        return tarball, False
    debs = cache / f"debs-{standin.key}"  # one per rootfs, so two builds can run at once
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"standin-{standin.key}-", dir=cache) as tmp:
        root = Path(tmp) / "rootfs"
        log = cache / f"debootstrap-{standin.key}.log"
        with log.open("w") as out:
            argv = ["debootstrap", "--variant=minbase", f"--cache-dir={debs}"]
            argv += [f"--include={','.join(standin.packages)}", standin.suite, str(root), mirror()]
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise SystemExit(f"debootstrap {standin.suite} failed: see {log}")
        # pip reaches the package index through a proxy whose CA is in the host's bundle
        shutil.copy(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
        if standin.suite == "sid":
            # the mirror serves sid's Release past its Valid-Until: apt-get update needs this
            conf = root / "etc/apt/apt.conf.d/99no-check-valid-until"
            conf.write_text('Acquire::Check-Valid-Until "false";\n')
        if isinstance(standin, PostgresStandin):
            changes = _prepare_postgres(root)
        else:
            # python and python3 name this version, as in the official image's /usr/local/bin
            for name in ("python", "python3"):
                link = root / "usr/local/bin" / name
                link.unlink(missing_ok=True)
                link.symlink_to(f"/usr/bin/python{standin.python}")
            changes = [f"ENV PATH={STD_PATH}", 'CMD ["python3"]']
        (cache / f"rootfs-{standin.key}.changes").write_text("\n".join(changes) + "\n")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        for docs in ("usr/share/doc", "usr/share/man", "usr/share/locale"):  # as slim images do
            shutil.rmtree(root / docs, ignore_errors=True)
        partial = tarball.with_suffix(".tar.partial")
        run(["tar", "-C", str(root), "-cf", str(partial), "."])
        partial.rename(tarball)
    return tarball, True


def image_exists(name: str) -> bool:
    found = subprocess.run(["docker", "image", "inspect", name], capture_output=True)
    return found.returncode == 0


def build(standin: Standin, names: list[str], cache: Path | None = None) -> list[str]:
    """Give every missing name in `names` an image of `standin`; return the names it built."""
    missing = [name for name in names if not image_exists(name)]
    if not missing:
        return []
    started = time.monotonic()
    tarball, fresh = rootfs_tarball(standin, cache or cache_dir())
    changes = ["ENV LANG=C.UTF-8", *tarball.with_suffix(".changes").read_text().splitlines()]
    argv = ["docker", "import", *(arg for c in changes for arg in ("--change", c))]
    run([*argv, str(tarball), missing[0]], stdout=subprocess.DEVNULL)
    for name in missing[1:]:
        run(["docker", "tag", missing[0], name])
    how = "debootstrapped now" if fresh else f"cached rootfs {tarball}"
    what = ", ".join(standin.packages[-2:])
    print(
        f"stand-in: built {', '.join(missing)} from Debian {standin.suite} packages "
        f"({what}; {how}) in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return missing


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="image names to create, e.g. python:3.11-slim")
    parser.add_argument("--suite", help="Debian suite (bookworm, trixie, sid)")
    parser.add_argument("--python", help="Python version, e.g. 3.14 (default: the suite's)")
    parser.add_argument("--postgres", action="store_true", help="a postgres image, not python")
    parser.add_argument("--cache", type=Path, help=f"cache directory (default {cache_dir()})")
    args = parser.parse_args(argv)
    standin: Standin
    if args.postgres:
        standin = PostgresStandin(args.suite or "bookworm")
    elif args.suite:
        standin = Standin(args.suite, args.python or DEFAULT_PYTHON[args.suite])
    else:
        standin = Standin.for_image(args.names[0])
    built = build(standin, args.names, args.cache)
    if not built:
        print(f"stand-in: {', '.join(args.names)} already present, nothing built")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
