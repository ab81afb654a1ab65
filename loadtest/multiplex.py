"""multiplex: N users, each holding one keep-alive connection with a request parked in `/await`.

One thread and one selector keep every connection open; a light probe on /healthz gives the
baseline the starvation and offload scenarios are judged against.

    locust -f loadtest/multiplex.py -H http://127.0.0.1:8080 --delay 10
"""

from looplab_users import AwaitUser, ProbeUser

__all__ = ["AwaitUser", "ProbeUser"]
