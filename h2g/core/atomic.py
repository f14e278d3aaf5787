"""Atomic file writes: a reader (or a resumed run) never sees half a file.

Every output of the package that another step may read back - stage results, run
tables, heatmaps, deployment outputs, cohort slides, checkpoints - is written through
:func:`replace_atomically`: the content goes to a hidden temporary file beside the target
(same folder, so the final ``os.replace`` is a rename on one file system), which then
replaces the target in one step.  Concurrent writers of the same deterministic file do
not clash: each has its own temporary name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def replace_atomically(target, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then move ``tmp`` over ``target``; the temporary file is removed if
    ``write`` fails.  ``tmp`` keeps the target's suffix (writers that pick a format by
    suffix, such as ``keras.Model.save`` or ``np.savez``, still work)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_json(target, obj: Any) -> Path:
    """``obj`` as indented, key-sorted JSON (non-JSON values through ``str``)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return replace_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(target, text: str) -> Path:
    return replace_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_npy(target, array) -> Path:
    """``np.save`` of ``array`` at ``target`` (a ``.npy`` path)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append .npy to the name
            np.save(fh, array)

    return replace_atomically(target, write)


def save_npz(target, **arrays) -> Path:
    """``np.savez_compressed`` of ``arrays`` at ``target`` (a ``.npz`` path)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append .npz to the name
            np.savez_compressed(fh, **arrays)

    return replace_atomically(target, write)
