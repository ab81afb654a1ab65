"""starvation: the multiplex crowd plus blockers on `/block`, which runs time.sleep on the loop.

While a blocker's handler sleeps, the loop serves nobody: watch the /healthz probe's latency and the
server's loop lag jump to the block duration.

    locust -f loadtest/starvation.py -H http://127.0.0.1:8080 --delay 1 --block 0.2 --blockers 2
"""

from looplab_users import AwaitUser, BlockUser, ProbeUser

__all__ = ["AwaitUser", "BlockUser", "ProbeUser"]
