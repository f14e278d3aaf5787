"""Ctrl-C (SIGINT) handling shared by the cohort driver and its executors: workers ignore
it (:func:`ignore_interrupts`, their initializer), the driver starts them with it held back
(:func:`interrupts_deferred`: a Ctrl-C meanwhile acts when they are started, never lost)
and its clean-up runs with it ignored (:func:`interrupts_ignored`)."""
from __future__ import annotations

import contextlib
import os
import signal
import threading


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


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT held back for the block and acted on at its end, in this process; processes
    started inside start with it blocked (the signal mask survives fork and exec), so a
    Ctrl-C to the process group while they import stays pending until their initializer
    ignores it (:func:`ignore_interrupts` discards it) instead of killing them with a
    traceback.

    Unlike :func:`interrupts_ignored`, a Ctrl-C that arrives inside the block is not lost:
    the kernel drops a signal whose action is ``SIG_IGN``, so a Ctrl-C landing while the
    driver spawned its workers made the whole cohort run on to the end (exit code 0).
    Here it is recorded and, once the block is left, handed to the handler that was
    installed before (:class:`h2g.core.cli` raises KeyboardInterrupt: exit code 130).
    Only the main thread can change it: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        # a Ctrl-C that came while it was blocked is delivered here, still to the recorder
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)  # KeyboardInterrupt, from here rather than inside the block
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
