"""Polygons to pixels: a pixel takes a polygon's value when its centre lies inside it.

The one rasteriser of polygon annotations (label maps, patch coverage, truth grids,
overlays).  A polygon (shapely ``Polygon`` / ``MultiPolygon``, holes included) is turned
into its edges once (:func:`polygon_edges`); :func:`fill` then sets every pixel of a
canvas whose centre is inside, by the even-odd rule, on an output grid whose pixel
``(i, j)`` covers level-0 ``[x0 + j sx, x0 + (j + 1) sx) x [y0 + i sy, y0 + (i + 1) sy)``.
A centre exactly on an edge belongs to the polygon on its left and top edges and not on
its right and bottom ones, so polygons that share an edge never both claim a pixel
(the rule of GDAL / rasterio's ``rasterize`` and scikit-image's ``draw.polygon``).

Why not OpenCV's ``fillPoly``: it also draws the outline, so each polygon grows by about
half a pixel on every side (measured on random polygons: 0.44 extra pixels per pixel of
outline), which biases every area, coverage fraction and partial label map.  The even-odd
scan here is a few vectorised numpy passes: one crossing per edge and scanline, a parity
toggle at the crossing's column, a cumulative sum along each row; memory is bounded by
working in bands of rows.  TensorFlow-free.
"""
from __future__ import annotations

import numpy as np

_BAND_CELLS = 1 << 22  # canvas cells processed per band (bounds the temporaries)


def polygon_edges(geometry) -> np.ndarray:
    """``(E, 4)`` float64 edges ``x0, y0, x1, y1`` of every ring (exterior and holes) of
    every polygon in ``geometry`` (a shapely Polygon, MultiPolygon or collection; other
    parts are ignored)."""
    import shapely

    polygons = [p for p in _polygons(geometry)]
    if not polygons:
        return np.zeros((0, 4))
    coords, ring = shapely.get_coordinates(shapely.get_rings(polygons), return_index=True)
    same = ring[:-1] == ring[1:]
    return np.concatenate([coords[:-1][same], coords[1:][same]], axis=1)


def _polygons(geometry):
    import shapely

    for part in shapely.get_parts(geometry):
        if part.geom_type == "Polygon":
            yield part
        elif part.geom_type in ("MultiPolygon", "GeometryCollection"):
            yield from _polygons(part)


def fill(canvas: np.ndarray, edges: np.ndarray, value, *, x0: float = 0.0, y0: float = 0.0,
         sx: float = 1.0, sy: float = 1.0, where: np.ndarray | None = None) -> None:
    """Set ``canvas`` (2-D) to ``value`` at every pixel whose centre lies inside the
    polygon of ``edges`` (:func:`polygon_edges`, level-0 coordinates), the canvas's
    pixel ``(i, j)`` being centred on level-0 ``(x0 + (j + 0.5) sx, y0 + (i + 0.5) sy)``.
    With ``where`` (a bool array like ``canvas``) instead, mark those pixels True in it
    and leave ``canvas`` alone."""
    rows, cols = canvas.shape
    if not len(edges) or not rows or not cols:
        return
    # pixel-centre frame: pixel (i, j) is centred on (u, v) = (j, i)
    u0 = (edges[:, 0] - x0) / sx - 0.5
    v0 = (edges[:, 1] - y0) / sy - 0.5
    u1 = (edges[:, 2] - x0) / sx - 0.5
    v1 = (edges[:, 3] - y0) / sy - 0.5
    keep = v0 != v1
    u0, v0, u1, v1 = u0[keep], v0[keep], u1[keep], v1[keep]
    if not len(u0):
        return
    # the rows an edge crosses: centres r with min(v) <= r < max(v) (a shared vertex counts once)
    first = np.clip(np.ceil(np.minimum(v0, v1)), 0, rows).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(v0, v1)), 0, rows).astype(np.int64)
    counts = np.maximum(stop - first, 0)
    total = int(counts.sum())
    if not total:
        return
    left = max(0, int(np.ceil(min(u0.min(), u1.min()))))
    right = min(cols, int(np.ceil(max(u0.max(), u1.max()))))
    if left >= right:
        return
    edge = np.repeat(np.arange(len(counts)), counts)
    row = first[edge] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
    slope = (u1 - u0) / (v1 - v0)
    x = u0[edge] + (row - v0[edge]) * slope[edge]
    # pixel j lies right of a crossing at x when j >= x: toggle parity from column ceil(x)
    column = np.clip(np.ceil(x), left, right).astype(np.int64) - left
    order = np.argsort(row, kind="stable")
    row, column = row[order], column[order]
    top, bottom = int(row[0]), int(row[-1]) + 1
    width = right - left
    band = max(1, _BAND_CELLS // (width + 1))
    for start in range(top, bottom, band):
        end = min(bottom, start + band)
        lo, hi = np.searchsorted(row, [start, end])
        if lo == hi:
            continue
        toggles = np.zeros((end - start, width + 1), np.uint8)
        np.add.at(toggles, (row[lo:hi] - start, column[lo:hi]), 1)
        inside = (np.cumsum(toggles[:, :width], axis=1, dtype=np.uint8) & 1).astype(bool)
        if where is not None:
            where[start:end, left:right] |= inside
        else:
            canvas[start:end, left:right][inside] = value
