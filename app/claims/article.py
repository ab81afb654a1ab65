"""The seed article, shipped with the code so every quote can be checked word for word."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources


@cache
def article_text() -> str:
    return resources.files("app.claims").joinpath("article.txt").read_text(encoding="utf-8")


def normalise(text: str) -> str:
    """Collapse runs of whitespace: the article's line breaks are layout, not words."""
    return re.sub(r"\s+", " ", text).strip()


def quote_position(quote: str) -> int:
    """Where the quote starts in the article, or -1 if the article does not say it verbatim."""
    return normalise(article_text()).find(normalise(quote))
