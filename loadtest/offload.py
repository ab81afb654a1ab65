"""offload: the starvation load, with the blocking call moved to a thread by run_in_executor.

Same crowd, same blockers, same block duration; the loop stays free, so the probe stays fast.

    locust -f loadtest/offload.py -H http://127.0.0.1:8080 --delay 1 --block 0.2 --blockers 2
"""

from looplab_users import AwaitUser, OffloadUser, ProbeUser

__all__ = ["AwaitUser", "OffloadUser", "ProbeUser"]
