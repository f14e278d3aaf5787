"""Measuring a run: wall and CPU seconds of a block, mean and sd of repeats, this process's
peak memory and the host it ran on.  Shared by the benchmarks and the cohort runner."""
from __future__ import annotations

import platform
import resource
import sys
import time

import numpy as np

from h2g.core.resources import available_cores


class Timed:
    """Wall and process CPU seconds (every thread) of a ``with`` block."""

    wall = cpu = 0.0  # nothing timed yet

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def mean_sd(values) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(list(values), np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd}


def peak_memory_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory() -> bool:
    """Restart this process's peak-memory count: on Linux, writing ``5`` to
    ``/proc/self/clear_refs`` resets the high-water mark that ``ru_maxrss`` reports to the
    current resident size.  False where that is not possible (other systems, a locked-down
    /proc): ``ru_maxrss`` then keeps the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB since it started or since
    :func:`reset_peak_memory`: Linux's ``VmHWM`` (``/proc/self/status``), the high-water
    mark that ``ru_maxrss`` reports without the part inherited through fork + exec (a
    spawned pool worker's ``ru_maxrss`` starts at its parent's peak); elsewhere
    :func:`peak_memory_mib`."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else peak_memory_mib()


def resident_memory_mb() -> float | None:
    """This process's resident memory now (``VmRSS``, MiB); None where /proc has none."""
    return _status_mib("VmRSS")


def _status_mib(field: str) -> float | None:
    """A kB field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB; None without it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host() -> dict:
    """Python version, machine and the CPU cores this process may use."""
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": available_cores()}
