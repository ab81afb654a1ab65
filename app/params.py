"""Query parameters with strict bounds: bad input is a 400 naming the parameter, never a 500.

Only plain ASCII decimals are numbers here: no sign, exponent, hex, unicode digits, `nan` or `inf`,
so what a user typed is exactly what the handler uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TypeVar

from aiohttp import web

from app.keys import SETTINGS

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z", re.ASCII)
_INTEGER = re.compile(r"[0-9]+\Z", re.ASCII)
_MAX_LEN = 32  # longer than any valid value; keeps huge strings away from float()/int()
S = TypeVar("S", bound=str)


def bad_param(param: str, allowed: str, error: str) -> web.HTTPBadRequest:
    body = {"error": error, "param": param, "allowed": allowed}
    return web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")


def _single(request: web.Request, name: str, allowed: str) -> str | None:
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise bad_param(name, allowed, f"{name} given {len(values)} times; give it once")
    return values[0]


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= _MAX_LEN else raw[:_MAX_LEN] + "...")


def float_param(request: web.Request, name: str, *, default: float, lo: float, hi: float) -> float:
    allowed = f"{lo:g} <= {name} <= {hi:g} (seconds, plain decimal)"
    raw = _single(request, name, allowed)
    if raw is None:
        return default
    if len(raw) > _MAX_LEN or not _DECIMAL.match(raw):
        raise bad_param(name, allowed, f"{name} must be a plain decimal number, got {_show(raw)}")
    value = float(raw)
    if not lo <= value <= hi:
        raise bad_param(name, allowed, f"{name}={raw} is out of range")
    return value


def int_param(request: web.Request, name: str, *, default: int, lo: int, hi: int) -> int:
    allowed = f"{lo} <= {name} <= {hi} (whole number)"
    raw = _single(request, name, allowed)
    if raw is None:
        return default
    if len(raw) > _MAX_LEN or not _INTEGER.match(raw):
        raise bad_param(name, allowed, f"{name} must be a whole number, got {_show(raw)}")
    value = int(raw)
    if not lo <= value <= hi:
        raise bad_param(name, allowed, f"{name}={raw} is out of range")
    return value


def choice_param(request: web.Request, name: str, choices: Sequence[S], default: S) -> S:
    allowed = "|".join(choices)
    raw = _single(request, name, allowed)
    if raw is None:
        return default
    for choice in choices:
        if raw == choice:
            return choice
    raise bad_param(name, allowed, f"{name} must be one of {allowed}, got {_show(raw)}")


def delay_param(request: web.Request, default: float) -> float:
    """`delay` in seconds, bounded by the server's --max-delay."""
    hi = request.app[SETTINGS].max_delay
    return float_param(request, "delay", default=min(default, hi), lo=0.0, hi=hi)
