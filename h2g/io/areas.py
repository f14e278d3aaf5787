"""Exact area averages of a raster over a grid of square cells, in bounded memory.

A raster (a mask or a label map, ``downsample`` level-0 px per pixel) is averaged over
cells of ``step`` level-0 px (``grid_shape`` = rows, cols, from level-0 (0, 0)): every
raster pixel counts with the area it shares with a cell, and the part of a cell beyond
the raster counts as nothing.  The average is separable: sparse overlap weights along
the columns, then along the rows, over row chunks read one at a time (so a raster can be
streamed from disk by region).  TensorFlow-free.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import sparse

_CHUNK_VALUES = 1 << 22  # raster values converted to float per chunk (bounds memory)


def overlap_weights(cells: int, cell: float, pixels: int) -> sparse.csr_matrix:
    """(cells, pixels) matrix: the length cell ``i`` = [i*cell, (i+1)*cell) shares with
    pixel ``j`` = [j, j+1), divided by ``cell``."""
    rows, cols, values = [], [], []
    for i in range(cells):
        start, stop = i * cell, (i + 1) * cell
        j = np.arange(max(0, math.floor(start)), min(pixels, math.ceil(stop)))
        overlap = np.minimum(stop, j + 1) - np.maximum(start, j)
        keep = overlap > 1e-9
        rows.append(np.full(keep.sum(), i))
        cols.append(j[keep])
        values.append(overlap[keep] / cell)
    return sparse.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(cells, pixels))


def cell_averages(rows_of: Callable[[int, int], np.ndarray] | np.ndarray, shape: tuple[int, int] | None,
                  downsample: float, step: float, grid_shape: tuple[int, int], values: Sequence,
                  step_y: float | None = None) -> np.ndarray:
    """Area averages over the grid cells of a raster (``None`` in ``values``) or of
    ``raster == v`` for each ``v`` in ``values``: ``(len(values), rows, cols)``.

    ``rows_of`` is the raster itself, or a function ``(top, n) -> rows top..top+n`` of a
    raster of ``shape`` (rows, cols) read on demand.  Cells are ``step`` level-0 px wide
    and ``step_y`` (default: ``step``) high."""
    if isinstance(rows_of, np.ndarray):
        image = rows_of
        shape = image.shape[:2]
        rows_of = lambda top, n: image[top:top + n]  # noqa: E731
    height, width = shape
    rows, cols = grid_shape
    across = overlap_weights(cols, step / downsample, width)  # (cols, raster w)
    down = overlap_weights(rows, (step if step_y is None else step_y) / downsample, height)  # (rows, raster h)
    chunk = max(1, _CHUNK_VALUES // max(1, width))
    by_row = np.empty((len(values), height, cols))
    for top in range(0, height, chunk):
        rows_block = rows_of(top, min(chunk, height - top))
        for k, value in enumerate(values):
            block = (rows_block if value is None else rows_block == value).astype(np.float32)
            by_row[k, top:top + len(rows_block)] = (across @ block.T).T
    return np.stack([down @ by_row[k] for k in range(len(values))])
