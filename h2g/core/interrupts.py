"""Ctrl-C (SIGINT) handling shared by the cohort driver and its executors: workers ignore
it (:func:`ignore_interrupts`, their initializer) and the driver's clean-up runs with it
ignored (:func:`interrupts_ignored`)."""
from __future__ import annotations

import contextlib
import signal


def ignore_interrupts() -> None:
    """A worker's initializer: Ctrl-C goes to the whole foreground process group, and only
    the driver acts on it (it stops the workers itself, see :meth:`PoolExecutor.abort`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_ignored():
    """SIGINT ignored in this process for the block (workers started inside inherit that,
    so a Ctrl-C while they import cannot kill them with a traceback; the driver's clean-up
    is not cut short by a second Ctrl-C).  Only the main thread can change it: elsewhere a
    no-op."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
