"""(split from h2g.inference; docstring to write)"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.inference.backends import Backend


# --------------------------------------------------------------------------------------
# Patch reading overlapped with inference
# --------------------------------------------------------------------------------------
class PatchReader:
    """Reads batches of patches in ``readers`` threads into a bounded queue.

    Iterating yields ``(start, batch)``: ``batch`` is float32 ``(b, P, P, 3)`` in [0, 1]
    holding patches ``coords[start:start + b]``; batches arrive in completion order.
    At most ``depth`` read batches wait in the queue, so memory is bounded whatever the
    slide size.  :attr:`read_seconds` sums the readers' busy time.  A reader error is
    re-raised in the consumer.  Use as a context manager (stops the threads)."""

    def __init__(self, slide, coords: np.ndarray, *, magnification: float, patch_size: int,
                 batch_size: int = 32, readers: int = 2, depth: int | None = None):
        if batch_size < 1 or readers < 1:
            raise ConfigError(f"batch_size and readers must be >= 1, got {batch_size} and {readers}")
        self.slide, self.coords = slide, np.asarray(coords)
        self.magnification, self.patch_size, self.batch_size = magnification, patch_size, batch_size
        self.n_batches = -(-len(self.coords) // batch_size)
        self.read_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth or 2 * readers)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"patch-reader-{i}")
                         for i in range(min(readers, max(self.n_batches, 1)))]
        for t in self._threads:
            t.start()

    def _read_batch(self, start: int) -> np.ndarray:
        size = (self.patch_size, self.patch_size)
        chunk = self.coords[start:start + self.batch_size]
        batch = np.empty((len(chunk), self.patch_size, self.patch_size, 3), np.float32)
        for i, (x, y) in enumerate(chunk):
            np.multiply(self.slide.read_region((int(x), int(y)), size, self.magnification),
                        np.float32(1 / 255), out=batch[i])
        return batch

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                index, self._next = self._next, self._next + 1
            if index >= self.n_batches:
                return
            start = index * self.batch_size
            t0 = time.perf_counter()
            try:
                item = (start, self._read_batch(start))
            except BaseException as exc:  # handed to the consumer, re-raised there
                item = (start, exc)
            with self._lock:
                self.read_seconds += time.perf_counter() - t0
            if not self._put(item):
                return

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for _ in range(self.n_batches):
            start, batch = self._queue.get()
            if isinstance(batch, BaseException):
                self.close()
                raise batch
            yield start, batch

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def __enter__(self) -> "PatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------
@dataclass
class Heatmap:
    """Tumour probability per patch-grid cell of a slide.

    ``probs[r, c]`` covers level-0 ``[c * step, (c + 1) * step) x [r * step, ...)``; cells
    outside tissue are 0.  ``tissue`` is the mask the grid was built from (None when the
    heatmap was loaded from disk)."""

    probs: np.ndarray  # (rows, cols) float32
    step: int  # level-0 px per cell
    tissue: object | None = None  # h2g.tissue.TissueMask
    n_patches: int = 0

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.probs.shape)


def _tumour_column(out: np.ndarray, backend) -> np.ndarray:
    if out.ndim != 2 or out.shape[1] < 2:
        raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} is not "
                          "(batch, classes) class probabilities of a patch classifier")
    return out[:, 1]


def slide_heatmap(slide, backend: Backend, *, tissue=None, magnification: float = 10,
                  patch_size: int = 256, batch_size: int = 32, readers: int = 2,
                  progress: bool = True, timings: dict | None = None) -> Heatmap:
    """The tumour heatmap of ``slide``: tissue mask (:func:`h2g.tissue.detect_tissue`
    unless given) -> grid of non-overlapping ``patch_size`` patches at ``magnification``
    over tissue -> batches read by ``readers`` threads while ``backend`` predicts ->
    each patch's class-1 probability in its grid cell.

    ``timings`` (a dict) receives seconds per stage: ``tissue`` (mask + grid), ``reading``
    (reader threads' busy time, summed), ``inference`` (inside the backend), ``waiting``
    (inference idle, waiting for patches), ``patch_pipeline`` (wall time of the overlapped
    reading + inference), ``stitching``, and ``patches`` (count)."""
    from tqdm.auto import tqdm

    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import detect_tissue

    backend.require_inputs(("image",), "patch classifier")
    t0 = time.perf_counter()
    if tissue is None:
        tissue = detect_tissue(slide)
    grid = build_patch_grid(slide, tissue=tissue, magnification=magnification, patch_size=patch_size)
    t1 = time.perf_counter()
    n = len(grid.coords)
    probs = np.zeros(n, np.float32)
    inference = waiting = 0.0
    with PatchReader(slide, grid.coords, magnification=magnification, patch_size=patch_size,
                     batch_size=batch_size, readers=readers) as reader, \
            tqdm(total=n, unit="patch", desc="patches", disable=not progress, leave=False) as bar:
        batches = iter(reader)
        while True:
            tw = time.perf_counter()
            item = next(batches, None)
            ti = time.perf_counter()
            waiting += ti - tw
            if item is None:
                break
            start, batch = item
            probs[start:start + len(batch)] = _tumour_column(backend.predict(batch), backend)
            inference += time.perf_counter() - ti
            bar.update(len(batch))
    t2 = time.perf_counter()
    heat = np.zeros(grid.grid_shape, np.float32)
    if n:
        cells = grid.coords // grid.step
        heat[cells[:, 1], cells[:, 0]] = probs
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(tissue=t1 - t0, reading=reader.read_seconds, inference=inference,
                       waiting=waiting, patch_pipeline=t2 - t1, stitching=t3 - t2, patches=n)
    return Heatmap(probs=heat, step=int(grid.step), tissue=tissue, n_patches=n)
