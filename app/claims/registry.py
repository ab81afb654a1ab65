"""The claim registry: what the article says, and the experiment that checks it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from app.claims.article import quote_position
from app.loops import LoopName

K = TypeVar("K")
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
    claim: str  # our one-line statement of what is checked
    quote: str  # the article's exact words
    experiment: Experiment
    timeout: float  # seconds; the runner gives up after this


_REGISTRY: dict[str, Claim] = {}


def claim(
    id: str, *, claim: str, quote: str, timeout: float = 10.0
) -> Callable[[Experiment], Experiment]:
    """Register the decorated function as the experiment that checks one claim of the article."""

    def register(fn: Experiment) -> Experiment:
        if id in _REGISTRY:
            raise ValueError(f"claim {id!r} registered twice")
        if quote_position(quote) < 0:
            raise ValueError(f"claim {id!r}: quote is not verbatim in the article: {quote!r}")
        _REGISTRY[id] = Claim(id=id, claim=claim, quote=quote, experiment=fn, timeout=timeout)
        return fn

    return register


def all_claims() -> list[Claim]:
    """Every claim, in the order the article makes them."""
    _load_experiments()
    return sorted(_REGISTRY.values(), key=lambda c: quote_position(c.quote))


def get_claim(id: str) -> Claim:
    _load_experiments()
    return _REGISTRY[id]


def _load_experiments() -> None:
    # Importing the topic modules runs their @claim decorators.
    from app.claims import (  # noqa: F401
        blocking,
        database,
        debugging,
        scale,
        scheduling,
        selector,
        threads,
        versions,
    )


def verdict_of(checks: Mapping[K, bool]) -> Verdict:
    """Every part of the claim held: true; none did: false; some did: partly."""
    held = sum(checks.values())
    if held == len(checks):
        return "true"
    return "false" if held == 0 else "partly"


def per_loop_evidence(parts: Mapping[LoopName, str]) -> str:
    """One experiment's evidence on each loop, in one line: `asyncio: ...; uvloop: ...`."""
    return "; ".join(f"{name}: {text}" for name, text in parts.items())
