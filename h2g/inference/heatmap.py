"""Patch-wise heatmaps: a slide's tissue patches read and classified, one probability
per patch-grid cell.  Patches are the paper's non-overlapping grid by default; with a
``stride`` smaller than the patch, one patch is centred on each ``stride``-sized cell, so
the heatmap is finer than the patches (each cell still sees a whole patch of context).

:class:`PatchReader` reads batches of patches on the process's reader pool (the one
training reads on, :func:`h2g.data.readers.reader_pool`) a bounded number of batches
ahead of the backend, so reading overlaps inference in bounded memory;
:func:`slide_heatmap` runs tissue detection -> patch grid -> reading + inference ->
stitching and reports the time of each stage.  TensorFlow-free (the backend decides).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.data.readers import ReadAhead, read_patch
from h2g.inference.backends import Backend


# --------------------------------------------------------------------------------------
# Patch reading overlapped with inference
# --------------------------------------------------------------------------------------
class PatchReader:
    """Reads batches of patches on the process's reader pool
    (:func:`h2g.data.readers.reader_pool`, ``readers`` threads: the pool training reads
    on), at most ``depth`` batches ahead of the consumer.

    Iterating yields ``(start, batch)``: ``batch`` is float32 ``(b, P, P, 3)`` in [0, 1]
    holding patches ``coords[start:start + b]`` (each read like
    :func:`h2g.data.readers.read_patch`: the top-left corner at level-0 ``coords``),
    batches in order.  At most ``depth`` (default ``2 * readers``) read batches wait,
    so memory is bounded whatever the slide size, and reading overlaps whatever the
    consumer does between batches.  :attr:`read_seconds` sums the readers' busy time.
    A reader error is re-raised in the consumer.  Use as a context manager (cancels
    what is not read yet and waits for what is being read)."""

    def __init__(self, slide, coords: np.ndarray, *, magnification: float, patch_size: int,
                 batch_size: int = 32, readers: int = 2, depth: int | None = None):
        if batch_size < 1 or readers < 1:
            raise ConfigError(f"batch_size and readers must be >= 1, got {batch_size} and {readers}")
        if depth is not None and depth < 1:
            raise ConfigError(f"depth must be >= 1, got {depth}")
        self.slide, self.coords = slide, np.asarray(coords)
        self.magnification, self.patch_size, self.batch_size = magnification, patch_size, batch_size
        self.n_batches = -(-len(self.coords) // batch_size)
        self.depth = depth or 2 * readers
        self._batches = ReadAhead(self._read_batch, range(0, len(self.coords), batch_size),
                                  readers=readers, depth=self.depth)

    @property
    def read_seconds(self) -> float:
        """Seconds the readers spent reading, summed over threads."""
        return self._batches.busy_seconds

    @property
    def pending(self) -> int:
        """Batches read or being read and not yet handed out (at most :attr:`depth`)."""
        return self._batches.pending

    def _read_batch(self, start: int) -> tuple[int, np.ndarray]:
        chunk = self.coords[start:start + self.batch_size]
        batch = np.empty((len(chunk), self.patch_size, self.patch_size, 3), np.float32)
        for i, (x, y) in enumerate(chunk):
            np.multiply(read_patch(self.slide, int(x), int(y), magnification=self.magnification,
                                   patch_size=self.patch_size), np.float32(1 / 255), out=batch[i])
        return start, batch

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self._batches

    def close(self) -> None:
        self._batches.close()

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
    tissue: object | None = None  # h2g.tiling.tissue.TissueMask
    n_patches: int = 0

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.probs.shape)


def _tumour_column(out: np.ndarray, backend) -> np.ndarray:
    if out.ndim != 2 or out.shape[1] < 2:
        raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} is not "
                          "(batch, classes) class probabilities of a patch classifier")
    return out[:, 1]


def check_stride(stride: int | None, patch_size: int) -> int:
    """``stride`` (px at the patch magnification between neighbouring patch centres) as an
    int, ``patch_size`` when None; :class:`ConfigError` outside 1..``patch_size`` (a
    larger stride would leave tissue that no patch sees)."""
    if stride is None:
        return int(patch_size)
    if int(stride) != stride or not 1 <= stride <= patch_size:
        raise ConfigError(f"heatmap stride must be an integer from 1 to the patch size {patch_size}, got {stride}")
    return int(stride)


def heatmap_grid(slide, tissue, *, magnification: float = 10, patch_size: int = 256, stride: int | None = None,
                 tissue_threshold: float = 0.25):
    """The heatmap's grid of ``stride`` px cells over tissue (a
    :class:`h2g.tiling.grid.PatchGrid`) and the level-0 top-left corners ``(N, 2)`` of the
    ``patch_size`` patches centred on its cells (the cells themselves when ``stride`` is
    None or the patch size)."""
    from h2g.tiling.grid import build_patch_grid

    stride = check_stride(stride, patch_size)
    grid = build_patch_grid(slide, tissue=tissue, magnification=magnification, patch_size=stride,
                            tissue_threshold=tissue_threshold)
    offset = (grid.step - int(round(patch_size * slide.downsample_for(magnification)))) // 2
    return grid, grid.coords + offset


def slide_heatmap(slide, backend: Backend, *, tissue=None, magnification: float = 10,
                  patch_size: int = 256, stride: int | None = None, tissue_threshold: float = 0.25,
                  batch_size: int = 32, readers: int = 2, progress: bool = True,
                  timings: dict | None = None) -> Heatmap:
    """The tumour heatmap of ``slide``: tissue mask (:func:`h2g.tiling.tissue.detect_tissue`
    unless given) -> grid of ``stride`` px cells at ``magnification`` (``stride`` None:
    ``patch_size``, the paper's non-overlapping patches) whose tissue fraction is above
    ``tissue_threshold`` -> the ``patch_size`` patch centred on each cell (white beyond
    the slide), in batches read by ``readers`` threads while ``backend`` predicts -> each
    patch's class-1 probability in its cell.  A stride of half the patch gives four
    times the patches and a heatmap twice as fine.

    ``timings`` (a dict) receives seconds per stage: ``tissue`` (mask + grid), ``reading``
    (reader threads' busy time, summed), ``inference`` (inside the backend), ``waiting``
    (inference idle, waiting for patches), ``patch_pipeline`` (wall time of the overlapped
    reading + inference), ``stitching``, and ``patches`` (count)."""
    from tqdm.auto import tqdm

    from h2g.tiling.tissue import detect_tissue

    backend.require_inputs(("image",), "patch classifier")
    t0 = time.perf_counter()
    if tissue is None:
        tissue = detect_tissue(slide)
    grid, corners = heatmap_grid(slide, tissue, magnification=magnification, patch_size=patch_size, stride=stride,
                                 tissue_threshold=tissue_threshold)
    t1 = time.perf_counter()
    n = len(grid.coords)
    probs = np.zeros(n, np.float32)
    inference = waiting = 0.0
    with PatchReader(slide, corners, magnification=magnification, patch_size=patch_size,
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
