"""`loop-lab claims`: check every checkable claim of the seed article by a small experiment."""

from __future__ import annotations

from app.claims import render
from app.claims.probes import only_loop
from app.claims.runner import Result, run_all
from app.loops import LoopName

__all__ = ["Result", "main", "run_all"]


def main(as_json: bool = False, as_markdown: bool = False, loop: LoopName | None = None) -> int:
    """Run every experiment and print the results; exit code 1 if any experiment failed to run.

    `loop` runs the experiments that compare loops on that one loop only (a matrix cell).
    """
    only_loop(loop)
    results = run_all()
    if as_json:
        print(render.as_json(results))
    elif as_markdown:
        print(render.as_markdown(results), end="")
    else:
        print(render.as_text(results))
    return 1 if any(r.verdict == "error" for r in results) else 0
