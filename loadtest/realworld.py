"""realworld: real loop killers one phase at a time, next to the /await crowd and the probe.

A blocking database driver, `requests` on the loop and a large `json.dumps` each get a phase,
followed by their offloaded or async form; the /healthz probe's latency in each phase is what that
form costs everyone else. /db is SQLite unless the server runs with --database-url (PostgreSQL).

    locust -f loadtest/realworld.py -H http://127.0.0.1:8080 -u 1000 -r 500 -t 90s --blockers 2
"""

from looplab_users import (
    AwaitUser,
    DbAsyncUser,
    DbOffloadUser,
    DbSyncUser,
    JsonInlineUser,
    JsonProcessUser,
    Phase,
    PhasedShape,
    ProbeUser,
    UpstreamAiohttpUser,
    UpstreamRequestsUser,
)

__all__ = [
    "AwaitUser",
    "DbAsyncUser",
    "DbOffloadUser",
    "DbSyncUser",
    "JsonInlineUser",
    "JsonProcessUser",
    "ProbeUser",
    "RealWorldShape",
    "UpstreamAiohttpUser",
    "UpstreamRequestsUser",
]

SHARE = 1 / 8


class RealWorldShape(PhasedShape):
    phases = (
        Phase("calm", SHARE),
        Phase("db sync", SHARE, active=(DbSyncUser,)),
        Phase("db offload", SHARE, active=(DbOffloadUser,)),
        Phase("db async", SHARE, active=(DbAsyncUser,)),
        Phase("upstream requests", SHARE, active=(UpstreamRequestsUser,)),
        Phase("upstream aiohttp", SHARE, active=(UpstreamAiohttpUser,)),
        Phase("json inline", SHARE, active=(JsonInlineUser,)),
        Phase("json process", SHARE, active=(JsonProcessUser,)),
    )
