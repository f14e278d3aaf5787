"""Sliding-window grids over a slide's tissue.

The output grid of a sliding-window segmentation is a raster at ``magnification``
(``d`` = ``slide.downsample_for(magnification)`` level-0 px per raster px).  It is cut
into cells of ``stride`` x ``stride`` raster px starting at (0, 0); the window of cell
``(i, j)`` is ``size`` x ``size`` raster px centred on the cell, i.e. its top-left raster
pixel is ``(j * stride - (size - stride) // 2, i * stride - ...)``.  A window's level-0
centre is ``(top-left + size / 2) * d``: views read around it (:mod:`h2g.data.views`)
have their pixel grids start exactly on raster pixel boundaries.

A cell is kept when the fraction of its footprint covered by tissue is >
``tissue_threshold`` (0 by default: any tissue), with the exact area average of
:func:`h2g.tiling.grid.area_fractions`.  The last row and column of cells may run past
the slide's edge; views read there are padded (reflection by default).

TensorFlow-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from h2g.core.errors import ConfigError
from h2g.tiling.grid import area_fractions
from h2g.tiling.tissue import TissueMask, detect_tissue


@dataclass
class WindowGrid:
    """Kept windows of a slide: ``cells`` (N, 2) as (row, col), ``top_left`` (N, 2) raster
    px as (row, col), ``centres`` (N, 2) level-0 (x, y); and the grid's geometry."""

    cells: np.ndarray
    top_left: np.ndarray
    centres: np.ndarray
    magnification: float
    size: int  # window side, raster px
    stride: int  # cell side, raster px
    downsample: float  # level-0 px per raster px
    extent: tuple[int, int]  # the slide's level-0 (w, h)
    grid_shape: tuple[int, int]  # cells (rows, cols)

    def __len__(self) -> int:
        return len(self.cells)


def window_grid(slide, *, magnification: float, size: int, stride: int | None = None,
                tissue: TissueMask | None = None, tissue_threshold: float = 0.0) -> WindowGrid:
    """The windows of ``size`` px at ``magnification``, one per ``stride`` x ``stride``
    cell (default: ``size``, no overlap) whose tissue fraction is > ``tissue_threshold``
    (see the module doc).  ``tissue`` defaults to :func:`detect_tissue` of the slide."""
    size, stride = int(size), int(stride or size)
    if size < 1 or stride < 1:
        raise ConfigError(f"window size and stride must be >= 1, got {size} and {stride}")
    if tissue is None:
        tissue = detect_tissue(slide)
    d = slide.downsample_for(magnification)
    width, height = slide.dimensions
    step = stride * d  # level-0 px per cell
    grid_shape = (max(1, int(np.ceil(height / step - 1e-9))), max(1, int(np.ceil(width / step - 1e-9))))
    fraction = area_fractions(tissue.mask, tissue.downsample, step, grid_shape)
    rows, cols = np.nonzero(fraction > tissue_threshold + 1e-9)
    cells = np.stack([rows, cols], axis=1).astype(np.int64)
    top_left = cells * stride - (size - stride) // 2
    centres = (top_left[:, ::-1] + size / 2.0) * d  # (x, y) level-0
    return WindowGrid(cells=cells, top_left=top_left, centres=centres.astype(np.float64),
                      magnification=float(magnification), size=size, stride=stride, downsample=float(d),
                      extent=(int(width), int(height)), grid_shape=grid_shape)
