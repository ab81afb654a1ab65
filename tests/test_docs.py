"""The README stays true to the code: every setting and every route is documented."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from app.application import create_app
from app.config import Settings, env_name, flag_name

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    """Each Settings field appears in README's configuration table as flag and env var."""
    for f in fields(Settings):
        assert f"`{flag_name(f.name)}" in README, flag_name(f.name)
        assert f"`{env_name(f.name)}`" in README, env_name(f.name)


def test_every_route_is_in_the_readme() -> None:
    """Each GET route the app serves is named in the README."""
    app = create_app()
    paths = {
        resource.canonical
        for resource in app.router.resources()
        if not resource.canonical.startswith("/static")
    }
    for path in paths:
        assert f"`{path}`" in README, path
