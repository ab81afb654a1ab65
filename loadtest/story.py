"""story: one run that walks calm -> starvation -> recovery -> offload -> calm.

Open the locust web UI and watch the /healthz probe: flat while calm, up to the block duration once
blockers run time.sleep on the loop, flat again when they stop, and still flat when the very same
blocking work is offloaded to a thread.

    locust -f loadtest/story.py -H http://127.0.0.1:8080 -u 500 -r 100 -t 150s --delay 1
"""

from looplab_users import AwaitUser, BlockUser, OffloadUser, Phase, PhasedShape, ProbeUser

__all__ = ["AwaitUser", "BlockUser", "OffloadUser", "ProbeUser", "StoryShape"]


class StoryShape(PhasedShape):
    phases = (
        Phase("calm", 0.20),
        Phase("starvation", 0.25, active=(BlockUser,)),
        Phase("recovery", 0.15),
        Phase("offload", 0.25, active=(OffloadUser,)),
        Phase("calm again", 0.15),
    )
