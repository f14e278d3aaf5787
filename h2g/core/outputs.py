"""Output paths checked before the work: a command that will write into a folder or a
file finds out at its start, in one line, that it cannot, instead of with a traceback
after the compute.

- :func:`check_output_dir`: the path is a folder or can become one (nothing on the way is
  a file) and a file can be created in it (or in the nearest folder that exists, where
  the missing ones will be made);
- :func:`check_output_file`: the path is not a folder, an existing file can be replaced
  (its folder is writable: outputs are written atomically, through a temporary beside the
  target) and its folder passes :func:`check_output_dir`.

Writability is tried, not guessed from permission bits: a temporary file is created and
removed in the folder (a read-only mount, or a folder another user owns, fail; root
passes where root can write).  Nothing is left behind, and missing folders are not made.
Both raise :class:`h2g.core.errors.ConfigError` naming the option, the path and the
problem; CLIs turn it into exit code 2 and one line.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from h2g.core.errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the current folder for a relative
    path none of whose parts exist)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def _writable(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (None: one can)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".h2g-write-check-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be (made into) a folder to write in; None when it can."""
    if folder.exists() and not folder.is_dir():
        return "exists and is not a folder"
    base = _nearest_existing(folder)
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    why = _writable(base)
    return None if why is None else f"cannot create files in {base}: {why}"


def check_output_dir(path, what: str = "--out") -> Path:
    """``path`` as a :class:`Path` when it is, or can become, a folder this process can
    write in; else :class:`ConfigError` naming ``what`` (the option) and the problem."""
    path = Path(path)
    problem = _folder_problem(path)
    if problem is not None:
        raise ConfigError(f"{what} {path}: {problem}")
    return path


def check_output_file(path, what: str) -> Path:
    """``path`` as a :class:`Path` when a file can be written there (created, or an
    existing one replaced: outputs are renamed into place, so the folder's permission is
    what counts); else :class:`ConfigError` naming ``what`` and the problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder, not a file")
    problem = _folder_problem(path.parent)
    if problem is not None:
        raise ConfigError(f"{what} {path}: its folder {path.parent} {problem}"
                          if problem.startswith("exists") else f"{what} {path}: {problem}")
    return path
