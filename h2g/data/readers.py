"""(split from h2g.sampling; docstring to write)"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    from h2g.data.sampler import SampleSource

_POOLS: dict[int, ThreadPoolExecutor] = {}  # reader pools by size (see reader_pool)
_POOLS_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def read_patch(
    source: SampleSource,
    x: int,
    y: int,
    *,
    magnification: float = 10.0,
    patch_size: int = 256,
) -> np.ndarray:
    """The ``(patch_size, patch_size, 3)`` uint8 patch of ``source`` at level-0 ``(x, y)``
    and ``magnification``, through the shared handle of :func:`h2g.wsi.open_slide`."""
    from h2g.io.slide import open_slide

    slide = open_slide(source.slide_path, source.mpp)
    return slide.read_region((x, y), (patch_size, patch_size), magnification)


def reader_pool(readers: int) -> ThreadPoolExecutor:
    """The process's pool of ``readers`` patch-reading threads, made on first use and
    shared by every dataset asking for that many.  Its threads are ordinary Python
    threads that live as long as the process, so thread-local state (an augmentation
    pipeline cached per thread) survives from one patch to the next, which it does not
    in the short-lived Python thread states of ``tf.numpy_function`` calls."""
    with _POOLS_LOCK:
        pool = _POOLS.get(readers)
        if pool is None:
            pool = _POOLS[readers] = ThreadPoolExecutor(readers, thread_name_prefix=f"h2g-reader{readers}")
        return pool


