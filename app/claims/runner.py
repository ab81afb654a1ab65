"""Run experiments one at a time, each bounded by its timeout, turning failures into results."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from app.claims.registry import Claim, Outcome, Verdict, all_claims

Status = Verdict | Literal["error"]


@dataclass(frozen=True)
class Result:
    id: str
    claim: str
    quote: str
    verdict: Status  # "error" only when the experiment itself failed or timed out
    evidence: str
    seconds: float
    data: Mapping[str, object] = field(default_factory=dict)  # the raw measurements, for tests

    def as_json(self) -> dict[str, str]:
        return {
            "id": self.id,
            "claim": self.claim,
            "quote": self.quote,
            "verdict": self.verdict,
            "evidence": self.evidence,
        }


def run_claim(claim: Claim) -> Result:
    """Run one experiment in its own thread so a hang cannot outlive its timeout."""
    box: list[Outcome | BaseException] = []

    def target() -> None:
        try:
            box.append(claim.experiment())
        except BaseException as exc:  # reported as the claim's result, never lost in a thread
            box.append(exc)

    start = time.monotonic()
    worker = threading.Thread(target=target, name=f"claim-{claim.id}", daemon=True)
    worker.start()
    worker.join(claim.timeout)
    seconds = time.monotonic() - start
    if not box:
        return _failed(claim, f"timed out after {claim.timeout:.0f} s", seconds)
    outcome = box[0]
    if isinstance(outcome, BaseException):
        where = traceback.extract_tb(outcome.__traceback__)[-1:]
        at = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno}" if where else ""
        return _failed(claim, f"experiment failed{at}: {outcome!r}", seconds)
    return Result(
        claim.id, claim.claim, claim.quote, outcome.verdict, outcome.evidence, seconds, outcome.data
    )


def _failed(claim: Claim, why: str, seconds: float) -> Result:
    return Result(claim.id, claim.claim, claim.quote, "error", why, seconds)


def run_all() -> list[Result]:
    return [run_claim(claim) for claim in all_claims()]
