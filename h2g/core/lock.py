"""A lock file that keeps two runs out of one output folder.

:class:`RunLock` creates ``PATH`` exclusively (``O_CREAT | O_EXCL``: atomic on local file
systems and on NFS v3+) holding the owner's pid, host and start time as JSON, and
removes it when released.  A second run finding the file is refused with one line
(:class:`~h2g.core.errors.ConfigError`) naming who holds it, unless the lock is *stale*:
written on this host by a process that no longer exists (a run killed with SIGKILL, a
machine reset), which is then removed and taken.  A lock from another host cannot be
checked and is never cleared automatically: the message says how to remove it by hand.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from h2g.core.errors import ConfigError


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(path, what="cohort run"): ...`` (see the module doc)."""

    def __init__(self, path, what: str = "run"):
        self.path = Path(path)
        self.what = what
        self.held = False

    def owner(self) -> dict | None:
        """The lock file's contents (None when absent or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a stale lock removed by us (or a racing run) is tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.owner()
                if holder is None:  # being written right now, or garbage: look again shortly
                    time.sleep(0.2)
                    holder = self.owner()
                if holder is not None and self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       if holder else "an unreadable lock")
                raise ConfigError(f"{self.path.parent}: another {self.what} is using this folder ({who}); wait for "
                                  f"it to finish, or remove {self.path} if that run is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise ConfigError(f"{self.path}: cannot take the lock (it keeps reappearing)")

    @staticmethod
    def _stale(holder: dict) -> bool:
        """Written on this host by a process that is gone."""
        try:
            pid = int(holder.get("pid"))
        except (TypeError, ValueError):
            return False
        return holder.get("host") == socket.gethostname() and pid != os.getpid() and not _alive(pid)

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            holder = self.owner()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
