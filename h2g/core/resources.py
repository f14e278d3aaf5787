"""What this process may use of the machine."""
from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its CPU affinity where the OS tells it): the
    default number of reader threads and of inference threads."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
