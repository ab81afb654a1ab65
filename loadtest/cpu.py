"""cpu: CPU-bound `/cpu` work inline, then in a thread, then in a process, next to crowd and probe.

Inline work blocks the loop outright; a thread gets it off the loop but still holds the GIL the loop
needs, so the loop only runs in the GIL's 5 ms switch slices; a process has its own interpreter.
Each way gets its own phase of the run, so the probe and the loop lag show them one at a time.

    locust -f loadtest/cpu.py -H http://127.0.0.1:8080 -u 200 -r 100 -t 80s --cpu-units 2000000
"""

from looplab_users import (
    AwaitUser,
    CpuInlineUser,
    CpuProcessUser,
    CpuThreadUser,
    Phase,
    PhasedShape,
    ProbeUser,
)

__all__ = ["AwaitUser", "CpuInlineUser", "CpuProcessUser", "CpuShape", "CpuThreadUser", "ProbeUser"]


class CpuShape(PhasedShape):
    phases = (
        Phase("calm", 0.25),
        Phase("cpu inline", 0.25, active=(CpuInlineUser,)),
        Phase("cpu thread", 0.25, active=(CpuThreadUser,)),
        Phase("cpu process", 0.25, active=(CpuProcessUser,)),
    )
