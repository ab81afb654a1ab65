"""Print the project's requirements from ./pyproject.toml, one per line, for `pip install -r`.

The Dockerfile installs these in a layer of their own before it copies the code, so a code
change does not reinstall every dependency. Usage: `python requirements.py [EXTRA ...]`.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

# An extra may name the project's own extras ("loop-lab[load,test]"): expand, never install it.
_SELF_REFERENCE = re.compile(r"^\s*(?P<name>[A-Za-z0-9._-]+)\s*\[(?P<extras>[^\]]*)\]\s*$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: Mapping[str, Any], extras: Sequence[str]) -> list[str]:
    """The base dependencies plus those of the named extras, in order, without duplicates."""
    own_name = _normalise(project["name"])
    optional: Mapping[str, list[str]] = project.get("optional-dependencies", {})
    result: list[str] = list(project.get("dependencies", []))
    pending, done = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in done:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        done.add(extra)
        for requirement in optional[extra]:
            match = _SELF_REFERENCE.match(requirement)
            if match and _normalise(match["name"]) == own_name:
                pending.extend(e.strip() for e in match["extras"].split(",") if e.strip())
            elif requirement not in result:
                result.append(requirement)
    return result


def main(argv: Sequence[str]) -> int:
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
