"""Where the slides of a cohort run: Ray tasks (local or a cluster) or a local process pool.

Both run :func:`h2g.export.cohort.run_task`, one call per slide in a worker process
(workers are reused from slide to slide), and share one small interface: ``submit(job) -> key`` and ``wait() -> (key, row)`` (the next finished slide;
a worker that died - killed, out of memory, crashed - gives a ``failed`` row), used as
context managers.

- :class:`RayExecutor`: with no address it starts a local Ray on this machine
  (``ray.init(num_cpus=workers x cpus_per_slide)``, no dashboard) and shuts it down at
  the end; ``address="auto"`` or ``HOST:PORT`` joins a cluster started with ``ray start``
  (left running).  A Ray already initialised in this process (a test, a notebook) is used
  as it is.  Each task asks for ``num_cpus`` / ``num_gpus`` / ``memory``, so Ray runs as
  many slides at once on a node as its resources hold.  Ray's own retries are off: the
  cohort retries a failed slide itself, the same way on both executors.
- :class:`PoolExecutor`: ``concurrent.futures.ProcessPoolExecutor`` (spawn context) of
  ``workers`` processes on this machine; what runs without the ``cluster`` extra.

Both take ``max_slides_per_worker`` (a worker process is replaced after that many slides:
Ray's ``max_calls``, the pool's ``max_tasks_per_child``), a safety net against anything a
worker might accumulate from slide to slide, and both have ``abort()``: what an interrupt
calls to stop every worker at once (see :func:`h2g.export.cohort.run_cohort`).

:func:`make_executor` picks one (``auto``: Ray when it is installed).
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from h2g.core.choices import Choice
from h2g.core.errors import ConfigError
from h2g.core.interrupts import ignore_interrupts, interrupts_deferred
from h2g.export.cohort import run_task

log = logging.getLogger(__name__)


class Executor(Choice):
    """Where a cohort's slides run: Ray when it is installed (``auto``), Ray, or a local
    process pool."""

    AUTO = "auto"
    RAY = "ray"
    PROCESS = "process"


EXECUTORS = Executor.values()
RAY_MISSING = "Ray is not installed: pip install 'h2g[cluster]' (or use --executor process)"


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


#: Seconds a terminated worker gets to exit before it is killed (an interrupt's clean-up).
TERMINATE_GRACE_S = 2.0


def _crashed(job: dict, exc: BaseException) -> dict:
    text = " ".join(str(exc).split())[:500]
    return {"slide_id": job["slide_id"], "path": str(job["path"]), "status": "failed",
            "error": f"worker process died: {type(exc).__name__}: {text}"}


class RayExecutor:
    """One Ray task per slide (see the module doc)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 1, cpus_per_slide: float = 1,
                 gpus_per_slide: float = 0, memory_per_slide: float | None = None,
                 max_slides_per_worker: int | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError(RAY_MISSING) from None
        self.ray = ray
        self.owned = not ray.is_initialized()
        if self.owned:
            if address:
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                except (ConnectionError, SystemExit) as exc:  # Ray exits when no GCS answers at HOST:PORT
                    raise ConfigError(f"cannot join the Ray cluster at {address} (started with `ray start "
                                      f"--head`?): {' '.join(str(exc).split()) or 'no answer'}") from None
            else:
                ray.init(num_cpus=max(1, round(workers * cpus_per_slide)),
                         num_gpus=None if gpus_per_slide else 0, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING)
        self._check_fits(cpus_per_slide, gpus_per_slide)
        requests = {"num_cpus": cpus_per_slide, "num_gpus": gpus_per_slide, "max_retries": 0}
        if memory_per_slide:
            requests["memory"] = int(memory_per_slide * 2**30)
        if max_slides_per_worker:  # Ray's own recycling: the worker process exits after that many calls
            requests["max_calls"] = int(max_slides_per_worker)
        self.task = ray.remote(**requests)(run_task)
        self.jobs: dict = {}  # ObjectRef -> job

    def _check_fits(self, cpus: float, gpus: float) -> None:
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        for what, need in (("CPU", cpus), ("GPU", gpus)):
            largest = max((n.get(what, 0) for n in nodes), default=0)
            if need > largest:
                self.close()
                raise ConfigError(f"--{what.lower()}s-per-slide {need:g}: no node of the Ray cluster has that "
                                  f"many {what}s (the largest has {largest:g})")

    def submit(self, job: dict):
        ref = self.task.remote(job)
        self.jobs[ref] = job
        return ref

    def wait(self):
        (ref,), _ = self.ray.wait(list(self.jobs), num_returns=1)
        job = self.jobs.pop(ref)
        try:
            return ref, self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001  (the worker died: killed, OOM; or Ray lost the task)
            return ref, _crashed(job, exc)

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()

    def abort(self) -> None:
        """Stop now (an interrupt): cancel every slide not finished, killing the tasks
        that run, then :meth:`close`."""
        for ref in list(self.jobs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001  (already finished, or Ray is going down)
                pass
        self.jobs.clear()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if it is not running) without its
    "leaked semaphore objects" warning: workers terminated by :meth:`PoolExecutor.abort`
    (Ctrl-C) can die holding the pool's queue semaphores, which the tracker then removes
    at exit, as it should, but with a warning printed after the CLI's last line."""
    from multiprocessing import resource_tracker

    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    added = quiet not in sys.warnoptions
    if added:
        sys.warnoptions.append(quiet)  # the tracker's interpreter gets the -W options
    try:
        resource_tracker.ensure_running()
    finally:
        if added:
            sys.warnoptions.remove(quiet)


class PoolExecutor:
    """A local pool of ``workers`` spawned processes (a new pool after a worker died).

    Slides wait in this process and go to the pool only as workers free up (at most
    ``workers`` in the pool at a time): an interrupt then has nothing queued to cancel,
    and ``max_slides_per_worker`` (a worker process is replaced after that many slides:
    ``max_tasks_per_child``, Python 3.11+), a bound on whatever a worker accumulates, does
    not meet CPython's deadlock with a backlog queued in the pool (gh-115634: with
    ``max_tasks_per_child`` the pool can stop replacing workers and hang).  Workers
    ignore Ctrl-C; the driver stops them (:meth:`abort`)."""

    name = "process"

    def __init__(self, workers: int = 1, max_slides_per_worker: int | None = None):
        self.workers = max(1, int(workers))
        self.max_slides_per_worker = int(max_slides_per_worker) if max_slides_per_worker else None
        if self.max_slides_per_worker and sys.version_info < (3, 11):
            raise ConfigError("--max-slides-per-worker with the process pool needs Python 3.11 or newer "
                              "(or use --executor ray)")
        self.pool = self._new_pool()
        self._keys = itertools.count()
        self.backlog: deque = deque()  # (key, job) not yet in the pool
        self.running: dict = {}  # Future -> (key, job)

    def _new_pool(self) -> ProcessPoolExecutor:
        _start_quiet_resource_tracker()
        extra = {"max_tasks_per_child": self.max_slides_per_worker} if self.max_slides_per_worker else {}
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=ignore_interrupts, **extra)

    def submit(self, job: dict):
        key = next(self._keys)
        self.backlog.append((key, job))
        self._fill()
        return key

    def _fill(self) -> None:
        """Hand waiting slides to the pool while a worker is free."""
        while self.backlog and len(self.running) < self.workers:
            key, job = self.backlog.popleft()
            with interrupts_deferred():  # workers spawned now start with Ctrl-C held back; ours acts after
                try:
                    future = self.pool.submit(run_task, job)
                except BrokenProcessPool:  # a worker died earlier: the pool takes no more work
                    self.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._new_pool()
                    future = self.pool.submit(run_task, job)
            self.running[future] = (key, job)

    def wait(self):
        self._fill()
        done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
        future = next(iter(done))
        key, job = self.running.pop(future)
        try:
            row = future.result()
        except Exception as exc:  # noqa: BLE001  (BrokenProcessPool: a worker died; its slides in flight fail)
            row = _crashed(job, exc)
        self._fill()
        return key, row

    def worker_pids(self) -> list[int]:
        """The pool's live worker processes."""
        return [p.pid for p in list((self.pool._processes or {}).values()) if p.is_alive()]

    def abort(self) -> None:
        """Stop now (an interrupt): no waiting slide starts, the workers are terminated
        (killed when they take longer than :data:`TERMINATE_GRACE_S`) and reaped, so that
        no worker goes on writing slides nobody will record."""
        self.backlog.clear()
        # No future.cancel() here: the pool's manager thread fails every pending future
        # with BrokenProcessPool once its workers are gone, and a future cancelled
        # beforehand makes it raise InvalidStateError (Python 3.11).
        processes = list((self.pool._processes or {}).values())
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        self.pool.shutdown(wait=False)
        self.running.clear()

    def close(self) -> None:
        self.backlog.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_executor(kind: str = "auto", *, address: str | None = None, workers: int = 1, cpus_per_slide: float = 1,
                  gpus_per_slide: float = 0, memory_per_slide: float | None = None,
                  max_slides_per_worker: int | None = None):
    """The executor ``kind`` names (``auto``: Ray when installed, else the process pool);
    ``max_slides_per_worker``: worker processes are replaced after that many slides."""
    kind = Executor.parse(kind, "executor")
    if max_slides_per_worker is not None and max_slides_per_worker < 1:
        raise ConfigError(f"--max-slides-per-worker must be >= 1, got {max_slides_per_worker}")
    if kind == Executor.AUTO:
        kind = Executor.RAY if ray_available() else Executor.PROCESS
    if kind == Executor.RAY:
        return RayExecutor(address, workers, cpus_per_slide, gpus_per_slide, memory_per_slide, max_slides_per_worker)
    if address:
        raise ConfigError("--address joins a Ray cluster; the process pool runs on this machine only")
    if gpus_per_slide:
        log.warning("--gpus-per-slide is a Ray resource request; the process pool does not assign GPUs")
    return PoolExecutor(workers, max_slides_per_worker)
