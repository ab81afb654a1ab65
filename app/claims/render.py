"""Render claim results as a terminal table, JSON, or the Markdown page docs/claims.md."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import textwrap
from datetime import UTC, datetime
from importlib.metadata import version

from app.claims.runner import Result

_MARK = {"true": "true", "false": "FALSE", "partly": "partly", "error": "ERROR"}


def as_json(results: list[Result]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2)


def as_text(results: list[Result], width: int | None = None) -> str:
    """A wrapped three-column table: claim, verdict, evidence."""
    width = width or max(100, shutil.get_terminal_size((140, 24)).columns)
    claim_w, verdict_w = 44, 7
    evidence_w = max(40, width - claim_w - verdict_w - 4)
    rule = "-" * (claim_w + verdict_w + evidence_w + 4)
    lines = [f"{'claim':<{claim_w}}  {'verdict':<{verdict_w}}  evidence", rule]
    for n, r in enumerate(results, 1):
        left = textwrap.wrap(f"{n}. {r.claim} [{r.id}]", claim_w)
        right = textwrap.wrap(r.evidence, evidence_w)
        for i in range(max(len(left), len(right))):
            claim_part = left[i] if i < len(left) else ""
            verdict_part = _MARK[r.verdict] if i == 0 else ""
            evidence_part = right[i] if i < len(right) else ""
            lines.append(
                f"{claim_part:<{claim_w}}  {verdict_part:<{verdict_w}}  {evidence_part}".rstrip()
            )
        lines.append(rule)
    counts = {v: sum(r.verdict == v for r in results) for v in _MARK}
    took = sum(r.seconds for r in results)
    lines.append(
        f"{len(results)} claims: "
        + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        + f" ({took:.1f} s)"
    )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _machine() -> str:
    try:
        uvloop_version = version("uvloop")
    except Exception:
        uvloop_version = "not installed"
    return (
        f"Python {platform.python_version()} ({sys.implementation.name}), uvloop {uvloop_version}, "
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs"
    )


def as_markdown(results: list[Result]) -> str:
    counts = {v: sum(r.verdict == v for r in results) for v in _MARK}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    took = sum(r.seconds for r in results)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = f"""# Claims of the article, checked

Each row is one claim from the seed article (`seed/000_865f2eab572884c5.txt`, copied to
`app/claims/article.txt`), the article's exact words, and the verdict of a small experiment that
`loop-lab claims` ran. Verdicts are never written by hand: each comes from what the experiment
measured or the exception it actually raised, and the evidence column gives those numbers.

- **true** — every part of the claim held in the experiment.
- **false** — the experiment contradicted it.
- **partly** — some parts held and some did not (often: asyncio and uvloop differ, or the claim
  is right about one case and wrong about another).

Where a result could depend on the loop, the experiment ran on both the default asyncio loop and
uvloop and the evidence names each. Timings are from one run and vary between runs; the verdicts
are what `tests/test_claims.py` pins.

Generated {generated} on {_machine()}; {len(results)} claims ({summary}) in {took:.1f} s.
Regenerate with `make claims` (runs `loop-lab claims --markdown > docs/claims.md`).

| # | claim | the article says | verdict | evidence |
|---|---|---|---|---|
"""
    rows = [
        f"| {n} | {_cell(r.claim)} `{r.id}` | “{_cell(r.quote)}” | **{r.verdict}** | "
        f"{_cell(r.evidence)} |"
        for n, r in enumerate(results, 1)
    ]
    return head + "\n".join(rows) + "\n"
