"""The claim registry: what the article says, and the experiment that checks it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["true", "false", "partly"]
VERDICTS: tuple[Verdict, ...] = ("true", "false", "partly")


@dataclass(frozen=True)
class Outcome:
    """What one experiment measured: a verdict derived from `data`, and the numbers in words."""

    verdict: Verdict
    evidence: str
    data: Mapping[str, object] = field(default_factory=dict)


Experiment = Callable[[], Outcome]


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str  # our paraphrase of what is being checked
    quote: str  # the article's exact words
    experiment: Experiment
    timeout: float


_REGISTRY: dict[str, Claim] = {}


def claim(
    id: str, *, claim: str, quote: str, timeout: float = 10.0
) -> Callable[[Experiment], Experiment]:
    """Register the decorated function as the experiment for one claim of the article."""

    def register(fn: Experiment) -> Experiment:
        if id in _REGISTRY:
            raise ValueError(f"claim {id!r} registered twice")
        _REGISTRY[id] = Claim(id=id, claim=claim, quote=quote, experiment=fn, timeout=timeout)
        return fn

    return register


def all_claims() -> list[Claim]:
    """Every claim, in the order the article makes them (registration order)."""
    _load_experiments()
    return list(_REGISTRY.values())


def get_claim(id: str) -> Claim:
    _load_experiments()
    return _REGISTRY[id]


def _load_experiments() -> None:
    # Importing the topic modules runs their @claim decorators; the order here is the article's order.
    from app.claims import (  # noqa: F401
        blocking,
        debugging,
        scale,
        scheduling,
        threads,
    )


def verdict_of(checks: Mapping[str, bool]) -> Verdict:
    """All sub-checks hold: true; none: false; some: partly."""
    hits = sum(checks.values())
    if hits == len(checks):
        return "true"
    return "false" if hits == 0 else "partly"
