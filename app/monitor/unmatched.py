"""Requests no route took: aiohttp answers them 404 or 405 itself, before any handler of the app.

aiohttp calls its access-log hook (`AbstractAccessLogger.log`) for every request it answers; the
monitor's access logger counts the ones whose match is aiohttp's `MatchInfoError` under the route
"unmatched", and writes the usual access-log line too when `--access-log` asks for one. The app
names it in its `handler_args`, so every runner that serves the app uses it.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger
from aiohttp.web_urldispatcher import MatchInfoError

from app.guard import release_unmatched_route
from app.keys import MONITOR
from app.monitor.metering import UNMATCHED

_AIOHTTP_ANSWERS = frozenset({web.HTTPNotFound, web.HTTPMethodNotAllowed})  # what its router raises


class UnmatchedCounter(AbstractAccessLogger):
    """aiohttp's access logger, made per connection: counts the requests no route took."""

    __slots__ = ()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # Called for every request, so the common case is one type test: a metered handler
        # answers a raised HTTPException with a plain response (metering.http_error_response),
        # so only aiohttp's own 404/405 reach this point as the exception itself.
        if type(response) not in _AIOHTTP_ANSWERS or not isinstance(request, web.Request):
            return
        try:
            match = request.match_info
        except AssertionError:  # never routed: the connection guard answered it (413, CONNECT)
            return
        if type(match) is MatchInfoError:
            release_unmatched_route(match.route)
            # aiohttp keeps the raised 404 in a local of the frame its traceback holds: a
            # reference cycle per request unless the traceback goes (docs/reliability.md)
            cast(web.HTTPException, response).__traceback__ = None
            record = request.app[MONITOR].routes.record_for(UNMATCHED)
            record.add_unprofiled(response.status, time)


class UnmatchedCounterAndAccessLog(UnmatchedCounter):
    """The counter, and aiohttp's access-log line for every request (`--access-log`)."""

    __slots__ = ("lines",)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.lines = AccessLogger(logger, log_format)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        super().log(request, response, time)
        if self.lines.enabled:
            self.lines.log(request, response, time)


def handler_args(access_log: bool) -> dict[str, Any]:
    """The app's `handler_args`: its access logger, whichever runner serves it."""
    return {
        "access_log_class": UnmatchedCounterAndAccessLog if access_log else UnmatchedCounter,
        "access_log": logging.getLogger("aiohttp.access"),
    }
