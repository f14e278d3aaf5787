"""Annotations: a slide's ground truth, read at the resolution each stage asks for.

:func:`load_annotation` reads any annotation file a manifest's ``annotation_path`` may
name, detected by its content:

- a **raster** mask or label map (PNG, or a TIFF, pyramidal or not) covering the slide
  at some downsample (any: found from its size, which must be the slide's level-0 size
  / downsample rounded down or up in both directions);
- **polygons**: QuPath GeoJSON, ASAP XML or Aperio ImageScope XML
  (:mod:`h2g.io.polygons`), coordinates in level-0 pixels.

Either becomes an :class:`AnnotationSource`, which answers in level-0 geometry, whatever
the format, the three questions the stages ask:

- :meth:`~AnnotationSource.sample`: the labels at the centres of any grid of points
  (a sample's view, a region, a label map at some downsample);
- :meth:`~AnnotationSource.class_fractions`: the share of each patch-grid cell covered
  by each class (the patch labels of :func:`h2g.tiling.grid.build_patch_grid`): exact
  area averages of a mask, exact polygon areas (shapely) of polygons;
- :meth:`~AnnotationSource.coverage`: the share of each cell of a coarse grid over the
  slide covered by one class (H2G-Net's truth at the refinement resolution).

Labels are class indices of a :class:`~h2g.io.classes.ClassTable` (:data:`IGNORE` = 255
for unannotated pixels and for points outside the slide).  What raster values mean:

- the default binary table (H2G-Net's tumour masks) keeps the historical rule: in a
  0/1 mask 1 is tumour, otherwise a value > 127 is tumour.  A mask with values in 1..127
  that is not a 0/1 mask (a label map such as {0, 1, 2}, or 1 = tumour beside 255 =
  ignore: {0, 1, 255}) would lose its tumour under that rule: it is an
  :class:`~h2g.core.errors.AnnotationError` naming the values and asking for a class table;
- any other table maps each pixel value to its class index, the table's ``ignore``
  values to :data:`IGNORE`; a value the table does not list is an error naming the file
  and the values.

What polygons mean (the README's "Your own slides" states the same):

- class names map through the table (:meth:`~h2g.io.classes.ClassTable.lookup`: names and
  the ``aliases`` column, ignoring case, spaces, ``-`` and ``_``).  With a multi-class
  table a name it does not know is an error naming the name, the file and the table's
  names.  With the binary table (no class table) tumour names (and ASAP's Camelyon
  groups ``_0``, ``_1``) are tumour and every other name non-tumour; the names read as
  non-tumour are logged with their polygon counts, so a typo shows;
- a binary annotation is full: outside its polygons is non-tumour.  A label-map one is
  partial: outside its polygons is unannotated (:data:`IGNORE`, DMMN's protocol);
- later shapes win where they overlap; exclusions (ASAP ``_2`` / ``Exclusion``,
  ``Exclusion`` / ``Ignore*`` classes, Aperio negative regions within their layer) always
  win, making their area what is outside the annotations;
- a self-intersecting polygon is repaired (shapely ``make_valid``) with a warning; parts
  outside the slide are clipped with a warning; an extent more than 1.5x the slide's is
  an error suggesting the wrong level or scale; polygons all outside the slide are an
  error; a file with no usable polygon is an unannotated slide (a warning; an error when
  ``required``, as for a test slide).

Pixels are labelled by the polygon their centre lies in (:mod:`h2g.io.rasterise`), only
on the grid a stage asks for: no level-0 raster is ever made.  Raster masks up to
:data:`IN_MEMORY_BYTES` are read whole, as before; larger TIFF masks are read region by
region (:mod:`h2g.io.masks`) from the pyramid level nearest the grid asked for (never
coarser).

An :class:`Annotation` is what the rest of the package holds: a source plus the grid of
its ``labels`` (``downsample`` level-0 px per pixel; made on first use, so ask for it
only where a whole map at that grid is wanted), ``mask`` (bool tumour), ``classes``,
``shape``, and the source's bounded-memory methods.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from h2g.core.errors import AnnotationError
from h2g.io.areas import cell_averages
from h2g.io.classes import BINARY, IGNORE, ClassTable, sidecar_path  # noqa: F401 (re-export)

log = logging.getLogger(__name__)

#: raster annotations up to this many bytes (level 0) are read whole
IN_MEMORY_BYTES = 64 << 20
#: truth grids of masks up to this many pixels are box-filtered by PIL (a float copy), larger ones by rows
BOX_FILTER_PIXELS = 1 << 24
#: label samples made per band of a label map / grid (bounds the temporaries)
BAND_SAMPLES = 1 << 23
#: points sampled per output pixel and axis for a truth grid (coverage) of polygons
COVERAGE_SUPERSAMPLE = (4, 8)
#: extents beyond this multiple of the slide's are an error (wrong level or scale)
EXTENT_LIMIT = 1.5
_CHUNK_VALUES = 1 << 22  # mask values processed per chunk (bounds temporaries)
_SHOWN_VALUES = 12  # unexpected values named in an error


# ==================================================================== sources
class AnnotationSource:
    """An annotation of one slide (level-0 extent ``dimensions`` = (w, h)) in class
    indices of ``classes``; ``outside`` is the label of unannotated pixels inside the
    slide (0 = non-tumour for binary annotations, :data:`IGNORE` for partial label maps).
    Subclasses implement :meth:`sample`; the rest has generic band-wise versions."""

    kind = "?"

    def __init__(self, path, dimensions, classes: ClassTable, outside: int):
        self.path = None if path is None else Path(path)
        self.dimensions = (int(dimensions[0]), int(dimensions[1]))
        self.classes = classes
        self.outside = int(outside)
        self.warnings: list[str] = []
        self.empty = False

    # -- the primitive ---------------------------------------------------------------
    def sample(self, x0: float, y0: float, sx: float, sy: float, cols: int, rows: int) -> np.ndarray:
        """``(rows, cols)`` uint8 labels at the level-0 points ``(x0 + (j + 0.5) sx,
        y0 + (i + 0.5) sy)``: the pixel centres of a grid of ``sx`` x ``sy`` level-0 px
        pixels whose top-left corner is ``(x0, y0)``.  Points outside the slide are
        :data:`IGNORE`."""
        raise NotImplementedError

    def _outside_slide(self, out: np.ndarray, x0, y0, sx, sy) -> np.ndarray:
        width, height = self.dimensions
        xs = x0 + (np.arange(out.shape[1]) + 0.5) * sx
        ys = y0 + (np.arange(out.shape[0]) + 0.5) * sy
        out[:, (xs < 0) | (xs >= width)] = IGNORE
        out[(ys < 0) | (ys >= height), :] = IGNORE
        return out

    # -- grids -------------------------------------------------------------------------
    def shape_at(self, downsample: float) -> tuple[int, int]:
        """(rows, cols) of the label map at ``downsample``: the slide's size / downsample,
        rounded up."""
        width, height = self.dimensions
        return math.ceil(height / downsample - 1e-9), math.ceil(width / downsample - 1e-9)

    def label_map(self, downsample: float) -> np.ndarray:
        """The whole slide's labels on the grid of ``downsample`` level-0 px per pixel
        (:meth:`shape_at`), sampled at pixel centres, band by band."""
        rows, cols = self.shape_at(downsample)
        out = np.empty((rows, cols), np.uint8)
        band = max(1, BAND_SAMPLES // max(1, cols))
        for top in range(0, rows, band):
            n = min(band, rows - top)
            out[top:top + n] = self.sample(0.0, top * downsample, downsample, downsample, cols, n)
        return out

    def class_fractions(self, step: float, grid_shape: tuple[int, int], resolution: int = 256,
                        classes: Sequence[int] | None = None) -> np.ndarray:
        """``(len(classes), rows, cols)``: the share of each cell of the patch grid
        (``step`` level-0 px a side from (0, 0), ``grid_shape`` = (rows, cols)) covered by
        each class (default: every class of the table); a cell's part outside the
        slide counts as nothing.  Here: labels sampled at ``resolution`` x
        ``resolution`` points per cell (the patch's own pixels), one row of cells at a
        time."""
        classes = list(range(self.classes.n_classes)) if classes is None else list(classes)
        rows, cols = grid_shape
        res = max(1, int(resolution))
        pitch = step / res
        out = np.zeros((len(classes), rows, cols))
        for row in range(rows):
            band = self.sample(0.0, row * step, pitch, pitch, cols * res, res).reshape(res, cols, res)
            for k, cls in enumerate(classes):
                out[k, row] = np.count_nonzero(band == cls, axis=(0, 2)) / (res * res)
        return out

    def coverage(self, index: int, cols: int, rows: int, downsample: float = 4.0) -> np.ndarray:
        """``(rows, cols)`` float32: the share of each cell of a ``cols`` x ``rows`` grid
        spanning the slide's level-0 extent that class ``index`` covers.  Here: the mean
        over ``k`` x ``k`` sample points per cell, ``k`` the cell's size over
        ``downsample`` (the annotation grid), within :data:`COVERAGE_SUPERSAMPLE`."""
        width, height = self.dimensions
        cx, cy = width / cols, height / rows
        low, high = COVERAGE_SUPERSAMPLE
        k = int(min(high, max(low, math.ceil(max(cx, cy) / max(downsample, 1e-9)))))
        out = np.empty((rows, cols), np.float32)
        band = max(1, BAND_SAMPLES // max(1, cols * k * k))
        for top in range(0, rows, band):
            n = min(band, rows - top)
            labels = self.sample(0.0, top * cy, cx / k, cy / k, cols * k, n * k)
            out[top:top + n] = (labels == index).reshape(n, k, cols, k).mean(axis=(1, 3))
        return out

    def pixel_counts(self, downsample: float) -> np.ndarray:
        """Labelled pixels per class on the grid of ``downsample`` (band by band)."""
        rows, cols = self.shape_at(downsample)
        counts = np.zeros(self.classes.n_classes, np.int64)
        band = max(1, BAND_SAMPLES // max(1, cols))
        for top in range(0, rows, band):
            n = min(band, rows - top)
            labels = self.sample(0.0, top * downsample, downsample, downsample, cols, n)
            counts += np.bincount(labels.ravel(), minlength=256)[:len(counts)]
        return counts


class RasterSource(AnnotationSource):
    """A mask or label map of ``native`` level-0 px per pixel: whole in memory (the
    arrays ``labels`` and, for the binary rule, ``mask``), or a :class:`MaskImage` read
    region by region."""

    kind = "raster"

    def __init__(self, path, dimensions, classes: ClassTable, native: float, *,
                 labels: np.ndarray | None = None, mask: np.ndarray | None = None, image=None):
        super().__init__(path, dimensions, classes, 0)
        self.native = float(native)
        self._labels, self._mask, self._image = labels, mask, image
        self._binary_rule = classes is BINARY or classes == BINARY
        self._mode = None  # binary rule of a streamed mask: "0/1" or ">127"
        self._lut = None
        if image is not None:
            self._prepare_streaming()

    @property
    def in_memory(self) -> bool:
        return self._labels is not None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the native grid."""
        if self._labels is not None:
            return self._labels.shape[1], self._labels.shape[0]
        return self._image.size

    def shape_at(self, downsample):
        if abs(downsample - self.native) < 1e-9:
            width, height = self.size
            return height, width
        return super().shape_at(downsample)

    # -- streamed masks: value rules per block -----------------------------------------
    def _prepare_streaming(self) -> None:
        if self._binary_rule:
            coarsest = self._image.levels[-1].read_all()
            values = _distinct_values(coarsest)
            if values.size and values.max() <= 1:
                self._mode = "0/1"
            elif np.any((values > 0) & (values <= 127)):
                raise AnnotationError(self.path, binary_values_problem(values))
            else:
                self._mode = ">127"
        else:
            self._lut = _lut(self.classes)

    def _map(self, values: np.ndarray) -> np.ndarray:
        """uint8 labels of a block of a streamed mask (checked as the whole mask is)."""
        if self._binary_rule:
            if values.dtype == bool:
                return values.view(np.uint8)
            if self._mode == "0/1":
                if values.size and values.max() > 1:
                    found = _distinct_values(values)
                    raise AnnotationError(self.path, binary_values_problem(found))
                return (values > 0).view(np.uint8)
            small = (values > 0) & (values <= 127)
            if small.any():
                raise AnnotationError(self.path, binary_values_problem(_distinct_values(values)))
            return (values > 127).view(np.uint8)
        return _map_labels(values, self.classes, self.path, self._lut)

    def _level_for(self, step: float) -> int:
        """The coarsest level of the image no coarser than ``step`` level-0 px."""
        best = 0
        for index, level in enumerate(self._image.levels):
            if level.downsample * self.native <= step + 1e-6:
                best = index
        return best

    def _read_labels(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._map(self._image.levels[level].read(x, y, w, h))

    # -- the interface --------------------------------------------------------------------
    def sample(self, x0, y0, sx, sy, cols, rows):
        out = np.full((rows, cols), IGNORE, np.uint8)
        width, height = self.dimensions
        xs = x0 + (np.arange(cols) + 0.5) * sx
        ys = y0 + (np.arange(rows) + 0.5) * sy
        if self.in_memory:
            self._gather(out, xs, ys, self._labels, self.native, width, height)
            return out
        level = self._level_for(min(sx, sy))
        grid = self.native * self._image.levels[level].downsample
        lw, lh = self._image.levels[level].width, self._image.levels[level].height
        ci = np.floor(xs / grid).astype(np.int64)
        ri = np.floor(ys / grid).astype(np.int64)
        c_ok = (xs >= 0) & (xs < width) & (ci >= 0) & (ci < lw)
        r_ok = (ys >= 0) & (ys < height) & (ri >= 0) & (ri < lh)
        if not c_ok.any() or not r_ok.any():
            return out
        c_lo, c_hi = int(ci[c_ok].min()), int(ci[c_ok].max()) + 1
        rows_ok = np.flatnonzero(r_ok)
        level_rows = ri[rows_ok]  # ascending
        piece = max(1, (4 * BAND_SAMPLES) // max(1, c_hi - c_lo))  # level rows read at once
        start = 0
        while start < len(rows_ok):
            r_lo = int(level_rows[start])
            end = int(np.searchsorted(level_rows, r_lo + piece, side="left"))
            r_hi = int(level_rows[end - 1]) + 1
            block = self._read_labels(level, c_lo, r_lo, c_hi - c_lo, r_hi - r_lo)
            these = rows_ok[start:end]
            out[np.ix_(these, c_ok)] = block[np.ix_(ri[these] - r_lo, ci[c_ok] - c_lo)]
            start = end
        return out

    @staticmethod
    def _gather(out, xs, ys, labels, grid, width, height) -> None:
        ci = np.floor(xs / float(grid)).astype(np.int64)
        ri = np.floor(ys / float(grid)).astype(np.int64)
        c_ok = (xs >= 0) & (xs < width) & (ci >= 0) & (ci < labels.shape[1])
        r_ok = (ys >= 0) & (ys < height) & (ri >= 0) & (ri < labels.shape[0])
        if r_ok.any() and c_ok.any():
            out[np.ix_(r_ok, c_ok)] = labels[np.ix_(ri[r_ok], ci[c_ok])]

    def label_map(self, downsample):
        if abs(downsample - self.native) < 1e-9:
            if self.in_memory:
                return self._labels
            width, height = self.size
            return self._read_labels(0, 0, 0, width, height)
        return super().label_map(downsample)

    def mask(self) -> np.ndarray | None:
        """The binary rule's boolean mask at the native grid (in memory only)."""
        return self._mask

    def class_fractions(self, step, grid_shape, resolution=256, classes=None):
        classes = list(range(self.classes.n_classes)) if classes is None else list(classes)
        if self.in_memory:
            return cell_averages(self._labels, None, self.native, step, grid_shape, classes)
        level = self._level_for(step / max(1, resolution))
        image = self._image.levels[level]
        return cell_averages(lambda top, n: self._read_labels(level, 0, top, image.width, n),
                             (image.height, image.width), self.native * image.downsample, step, grid_shape, classes)

    def coverage(self, index, cols, rows, downsample=4.0):
        width, height = self.dimensions
        if self.in_memory:
            return _box_coverage(self._labels, index, self.native, width, height, cols, rows)
        level = self._level_for(max(width / cols, height / rows) / COVERAGE_SUPERSAMPLE[0])
        image = self._image.levels[level]
        grid = self.native * image.downsample
        if image.nbytes <= IN_MEMORY_BYTES:
            return _box_coverage(self._read_labels(level, 0, 0, image.width, image.height), index,
                                 grid, width, height, cols, rows)
        return cell_averages(lambda top, n: self._read_labels(level, 0, top, image.width, n),
                             (image.height, image.width), grid, width / cols, (rows, cols), [index],
                             step_y=height / rows)[0].astype(np.float32)

    def pixel_counts(self, downsample):
        if abs(downsample - self.native) < 1e-9 and self.in_memory:
            labels = self._labels
            return np.bincount(labels.ravel(), minlength=256)[:self.classes.n_classes].astype(np.int64)
        return super().pixel_counts(downsample)


def _box_coverage(labels: np.ndarray, value: int, grid: float, width: int, height: int, cols: int,
                  rows: int) -> np.ndarray:
    """``labels == value`` (``grid`` level-0 px per pixel) cut or padded to the slide's
    extent and area-averaged (PIL's box filter) onto ``cols`` x ``rows`` cells; above
    :data:`BOX_FILTER_PIXELS`, the same area average row chunk by row chunk (no
    full-size float copy)."""
    mw, mh = int(round(width / grid)), int(round(height / grid))
    if mw * mh > BOX_FILTER_PIXELS:
        return cell_averages(labels[:mh, :mw], None, grid, width / cols, (rows, cols), [value],
                             step_y=height / rows)[0].astype(np.float32)
    indicator = labels == value
    plane = np.zeros((mh, mw), np.float32)
    src = indicator[:mh, :mw]
    plane[: src.shape[0], : src.shape[1]] = src
    return np.asarray(Image.fromarray(plane, mode="F").resize((cols, rows), Image.BOX))


class PolygonSource(AnnotationSource):
    """Polygons of a :class:`~h2g.io.polygons.PolygonFile`, their names mapped through
    ``classes``, checked against the slide's extent and clipped to it (see the module
    doc); labels are painted in file order, exclusions last, only where asked."""

    kind = "polygons"

    def __init__(self, polygons, dimensions, classes: ClassTable):
        import shapely

        binary = classes.is_binary
        super().__init__(polygons.path, dimensions, classes, 0 if binary else IGNORE)
        self.format = polygons.format
        self.format_name = polygons.format_name
        self.warnings = list(polygons.warnings)
        self.non_tumour: Counter = Counter()  # binary: names read as non-tumour -> polygons
        shapes = [s for s in polygons.shapes if not s.geometry.is_empty]
        pairs = list(zip(shapes, self._labels_of(shapes, binary)))
        self._check_extent(shapes)
        features, exclusions = self._clipped(self._cut_scoped(pairs))
        self.features = features      # [(label, geometry)] in paint order
        self.exclusions = exclusions  # [geometry]
        self.empty = not features
        self.polygons = Counter()
        for label, geometry in features:
            self.polygons[label] += len(shapely.get_parts(geometry))
        geometries = [g for _, g in features] + exclusions
        self._edges = [None] * len(geometries)
        self._geometries = geometries
        self._tree = shapely.STRtree(geometries) if geometries else None
        self._lock = threading.Lock()

    # -- construction --------------------------------------------------------------------
    def _labels_of(self, shapes, binary: bool) -> list[int | None]:
        """Each shape's class index (None for exclusions); unknown names are an error."""
        table, tumour = self.classes, self.classes.tumour_index
        labels, unknown = [], Counter()
        for shape in shapes:
            if shape.exclusion:
                labels.append(None)
                continue
            index = table.lookup(shape.name)
            if index is None and shape.tumour_group and tumour is not None:
                index = tumour
            if binary:
                if index != tumour:
                    index = 1 - tumour
                    self.non_tumour[shape.name] += shape.polygons
            elif index is None:
                unknown[shape.name] += shape.polygons
            labels.append(index)
        if unknown:
            names = ", ".join(f"{n!r} ({k} polygon(s))" for n, k in unknown.items())
            where = f" ({table.source})" if table.source else ""
            raise AnnotationError(self.path, f"class name(s) {names} not in the class table{where}, which knows "
                                             f"{table.describe()}: add them to its aliases column "
                                             "(e.g. Tumor;_0;_1) or rename them")
        return labels

    def _check_extent(self, shapes) -> None:
        if not shapes:
            return
        import shapely

        minx, miny, maxx, maxy = shapely.total_bounds([s.geometry for s in shapes])
        width, height = self.dimensions
        slack = EXTENT_LIMIT - 1
        if maxx > EXTENT_LIMIT * width or maxy > EXTENT_LIMIT * height or minx < -slack * width \
                or miny < -slack * height:
            raise AnnotationError(
                self.path, f"the annotation spans x {minx:.0f}..{maxx:.0f}, y {miny:.0f}..{maxy:.0f}, more than "
                           f"{EXTENT_LIMIT:g}x the slide's {width}x{height} level-0 px: coordinates at another "
                           "pyramid level or scale, or the annotation of another slide?")

    @staticmethod
    def _cut_scoped(pairs):
        """Aperio negative regions cut out of the other regions of their layer:
        ``(shape, label)`` pairs without the scoped exclusions."""
        import dataclasses

        import shapely

        scoped = [s for s, _ in pairs if s.exclusion and s.scope is not None]
        if not scoped:
            return pairs
        out = []
        for shape, label in pairs:
            if shape.exclusion and shape.scope is not None:
                continue
            cuts = [s.geometry for s in scoped if s.scope == shape.layer and s.geometry.intersects(shape.geometry)]
            if cuts and not shape.exclusion:
                shape = dataclasses.replace(shape, geometry=_polygonal(
                    shape.geometry.difference(shapely.unary_union(cuts))))
            if not shape.geometry.is_empty:
                out.append((shape, label))
        return out

    def _clipped(self, pairs):
        import shapely

        width, height = self.dimensions
        frame = shapely.box(0, 0, width, height)
        features, exclusions, clipped, outside = [], [], 0, 0
        for shape, label in pairs:
            geometry = shape.geometry
            if not frame.contains(geometry):
                clipped += 1
                geometry = _polygonal(geometry.intersection(frame))
                if geometry.is_empty:
                    outside += 1
                    continue
            if shape.exclusion:
                exclusions.append(geometry)
            else:
                features.append((label, geometry))
        if clipped:
            self.warnings.append(f"{clipped} shape(s) reach outside the slide ({width}x{height} px): clipped"
                                 + (f", {outside} of them entirely outside" if outside else ""))
        if pairs and not features and not exclusions:
            raise AnnotationError(self.path, f"every polygon lies outside the slide ({width}x{height} level-0 "
                                             "px): coordinates at another level or origin?")
        return features, exclusions

    # -- painting -------------------------------------------------------------------------
    def _edges_of(self, index: int) -> np.ndarray:
        edges = self._edges[index]
        if edges is None:
            from h2g.io.rasterise import polygon_edges

            edges = polygon_edges(self._geometries[index])
            with self._lock:
                self._edges[index] = edges
        return edges

    def sample(self, x0, y0, sx, sy, cols, rows):
        import shapely

        from h2g.io.rasterise import fill

        out = np.full((rows, cols), self.outside, np.uint8)
        if self._tree is not None and rows and cols:
            box = shapely.box(x0, y0, x0 + cols * sx, y0 + rows * sy)
            n_features = len(self.features)
            for index in np.sort(self._tree.query(box)):
                value = self.features[index][0] if index < n_features else self.outside
                fill(out, self._edges_of(int(index)), value, x0=x0, y0=y0, sx=sx, sy=sy)
        return self._outside_slide(out, x0, y0, sx, sy)

    def class_fractions(self, step, grid_shape, resolution=256, classes=None):
        """As :meth:`AnnotationSource.class_fractions`, from the geometry: the exact area
        each class has in each cell, with the painting rules (later shapes win,
        exclusions always win) applied to the shapes the spatial index finds in the
        cell.  A cell one shape touches is measured in one vectorised shapely pass (a
        cell the shape contains counts whole); a cell several shapes touch is resolved
        on its own.  The outside label (binary: non-tumour) has what is left of the
        cell's part inside the slide.  ``resolution`` plays no part."""
        import shapely

        classes = list(range(self.classes.n_classes)) if classes is None else list(classes)
        rows, cols = grid_shape
        width, height = self.dimensions
        r, c = np.divmod(np.arange(rows * cols), cols)
        boxes = shapely.box(c * step, r * step, (c + 1) * step, (r + 1) * step)
        inside = (np.clip(width - c * step, 0, step) * np.clip(height - r * step, 0, step)).astype(np.float64)
        n_labels = self.classes.n_classes
        area = np.zeros((n_labels, rows * cols))
        if self._tree is not None:
            cell, shape = self._tree.query(boxes, predicate="intersects")
            order = np.lexsort((shape, cell))
            cell, shape = cell[order], shape[order]
            geometries = np.asarray(self._geometries, dtype=object)
            n_features = len(self.features)
            labels = np.array([label for label, _ in self.features] + [-1] * len(self.exclusions))
            counts = np.bincount(cell, minlength=rows * cols)
            alone = (counts[cell] == 1) & (shape < n_features)
            if alone.any():
                measured = _areas_of(boxes[cell[alone]], geometries[shape[alone]])
                np.add.at(area, (labels[shape[alone]], cell[alone]), measured)
            starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
            for first, last in zip(starts, np.r_[starts[1:], len(cell)]):
                if last - first < 2:
                    continue
                self._resolve_cell(boxes[cell[first]], shape[first:last], n_features, labels, geometries,
                                   area[:, cell[first]])
        out = np.zeros((len(classes), rows * cols))
        for k, cls in enumerate(classes):
            if cls == self.outside:
                others = [k2 for k2 in range(n_labels) if k2 != self.outside]
                out[k] = np.clip(inside - area[others].sum(axis=0), 0, None)
            elif 0 <= cls < n_labels:
                out[k] = area[cls]
        return (out / float(step) ** 2).reshape(len(classes), rows, cols)

    @staticmethod
    def _resolve_cell(box, shapes, n_features, labels, geometries, area) -> None:
        """Add to ``area`` (per label) what each of several ``shapes`` (indices, in
        painting order) leaves visible in ``box``: exclusions first, then the latest."""
        import shapely

        pieces = shapely.intersection(box, geometries[shapes])
        excluded = [p for p, s in zip(pieces, shapes) if s >= n_features]
        kinds = set(labels[shapes[shapes < n_features]].tolist())
        if not excluded and len(kinds) == 1:  # one class: the area of its union
            area[kinds.pop()] += shapely.union_all(pieces).area
            return
        covered = shapely.union_all(excluded) if excluded else None
        for piece, s in zip(pieces[::-1], shapes[::-1]):
            if s >= n_features or piece.is_empty:
                continue
            overlaps = covered is not None and piece.intersects(covered)
            area[labels[s]] += piece.difference(covered).area if overlaps else piece.area
            covered = piece if covered is None else shapely.union(covered, piece)

    # -- geometry -----------------------------------------------------------------------
    def class_regions(self) -> dict[int, object]:
        """Each class's area as resolved geometry: later shapes cut out of earlier ones,
        exclusions out of all (class index -> MultiPolygon)."""
        import shapely

        regions: dict[int, list] = {}
        exclusions = shapely.unary_union(self.exclusions) if self.exclusions else None
        if exclusions is not None:
            shapely.prepare(exclusions)
        tree = shapely.STRtree([g for _, g in self.features]) if self.features else None
        for k, (label, geometry) in enumerate(self.features):
            later = [self.features[j][1] for j in tree.query(geometry, predicate="intersects")
                     if j > k and self.features[j][0] != label]  # a class's own overlaps merge below
            if later:
                geometry = geometry.difference(shapely.unary_union(later))
            if exclusions is not None and exclusions.intersects(geometry):
                geometry = geometry.difference(exclusions)
            regions.setdefault(label, []).append(_polygonal(geometry))
        return {label: _polygonal(shapely.unary_union(parts)) for label, parts in regions.items()}


def _areas_of(boxes, geometries) -> np.ndarray:
    """The area each geometry has in its box (pairwise; a box its geometry contains
    counts whole)."""
    import shapely

    shapely.prepare(geometries)
    whole = shapely.contains(geometries, boxes)
    areas = np.where(whole, shapely.area(boxes), 0.0)
    cut = ~whole
    if cut.any():
        areas[cut] = shapely.area(shapely.intersection(boxes[cut], geometries[cut]))
    return areas


def _polygonal(geometry):
    """The polygons of a geometry (lines and points of an intersection dropped)."""
    import shapely

    parts = [p for p in shapely.get_parts(geometry) if p.geom_type == "Polygon" and not p.is_empty]
    if not parts:
        nested = [p for g in shapely.get_parts(geometry) if g.geom_type in ("MultiPolygon", "GeometryCollection")
                  for p in shapely.get_parts(_polygonal(g)).tolist()]
        parts = nested
    if not parts:
        return shapely.Polygon()
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


# ==================================================================== the holder
class Annotation:
    """A slide's ground truth: its :class:`AnnotationSource` and the grid of its
    ``labels`` (``downsample`` level-0 px per pixel).

    ``Annotation(mask, downsample, path)`` wraps a boolean tumour mask (the binary
    table); :meth:`from_labels` a label map of another table; :func:`load_annotation`
    any annotation file."""

    def __init__(self, mask: np.ndarray | None, downsample: float, path: Path | None = None, *,
                 labels: np.ndarray | None = None, classes: ClassTable | None = None,
                 source: AnnotationSource | None = None):
        self.downsample = float(downsample)
        self.path = None if path is None else Path(path)
        if source is None:
            if mask is None and labels is None:
                raise ValueError("an annotation needs a mask, a label map or a source")
            if labels is None:
                mask = np.asarray(mask, bool)
                labels = mask.view(np.uint8)  # bool is one byte of 0/1: the label map, free
                labels.flags.writeable = False
            dimensions = (labels.shape[1] * self.downsample, labels.shape[0] * self.downsample)
            source = RasterSource(path, dimensions, BINARY if classes is None else classes, self.downsample,
                                  labels=labels, mask=mask)
        self.source = source
        self.classes = source.classes
        self._labels = None
        self._mask = None
        self._lock = threading.Lock()

    @classmethod
    def from_labels(cls, labels: np.ndarray, downsample: float, path: Path | None,
                    classes: ClassTable) -> Annotation:
        """An annotation of the uint8 label map ``labels`` (class indices, :data:`IGNORE`)."""
        return cls(None, downsample, path, labels=np.asarray(labels, np.uint8), classes=classes)

    # -- whole maps at the annotation's grid (made on first use) ------------------------
    @property
    def labels(self) -> np.ndarray:
        """uint8 class indices on the grid of :attr:`downsample` (:data:`IGNORE` =
        unannotated); for a binary raster at its own grid, a read-only view of
        :attr:`mask`."""
        if self._labels is None:
            with self._lock:
                if self._labels is None:
                    self._labels = self.source.label_map(self.downsample)
        return self._labels

    @property
    def mask(self) -> np.ndarray:
        """Boolean tumour mask: ``labels == classes.tumour_index`` (ignored pixels are not
        tumour).  :class:`AnnotationError` when the class table has no tumour class."""
        if self._mask is None:
            source = self.source
            if isinstance(source, RasterSource) and source.mask() is not None \
                    and abs(source.native - self.downsample) < 1e-9:
                self._mask = source.mask()
            else:
                tumour = self.classes.tumour_index
                if tumour is None:
                    raise AnnotationError(self.path, f"no tumour class in the class table "
                                                     f"({', '.join(self.classes.names)}): no tumour mask")
                self._mask = _equal_chunked(self.labels, tumour)
        return self._mask

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of :attr:`labels` (without making it)."""
        if self._labels is not None:
            return tuple(self._labels.shape)
        return tuple(self.source.shape_at(self.downsample))

    # -- bounded-memory reads (delegated to the source) ---------------------------------
    def sample(self, x0: float, y0: float, sx: float, sy: float, cols: int, rows: int) -> np.ndarray:
        """:meth:`AnnotationSource.sample`."""
        return self.source.sample(x0, y0, sx, sy, cols, rows)

    def class_fractions(self, step: float, grid_shape: tuple[int, int], resolution: int = 256,
                        classes: Sequence[int] | None = None) -> np.ndarray:
        """:meth:`AnnotationSource.class_fractions`."""
        return self.source.class_fractions(step, grid_shape, resolution, classes)

    def coverage(self, index: int, cols: int, rows: int) -> np.ndarray:
        """:meth:`AnnotationSource.coverage` (sampled relative to :attr:`downsample`)."""
        return self.source.coverage(index, cols, rows, self.downsample)

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def warnings(self) -> list[str]:
        return self.source.warnings

    @property
    def empty(self) -> bool:
        """A polygon file with no usable polygon (an unannotated slide)."""
        return self.source.empty

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (f"Annotation({str(self.path)!r}, {self.kind}, {cols}x{rows} px at downsample "
                f"{self.downsample:g}, classes {', '.join(self.classes.names)})")


# ==================================================================== raster values
def _equal_chunked(labels: np.ndarray, value: int) -> np.ndarray:
    out = np.empty(labels.shape, bool)
    chunk = _rows_per_chunk(labels)
    for top in range(0, labels.shape[0], chunk):
        np.equal(labels[top:top + chunk], value, out=out[top:top + chunk])
    return out


def _rows_per_chunk(array: np.ndarray) -> int:
    return max(1, _CHUNK_VALUES // max(1, array.shape[1] if array.ndim > 1 else 1))


def _binarise(values: np.ndarray, path: Path) -> np.ndarray:
    """The historical binary rule (see the module doc); label maps are refused."""
    if values.dtype == bool:
        return values
    if not values.size:
        return values > 0
    top = values.max()
    if top <= 1:
        return values > 0
    small = values[(values > 0) & (values <= 127)]
    if small.size:  # label-like values (a label map, or 1 = tumour beside 255 = ignore)
        raise AnnotationError(path, binary_values_problem(_distinct_values(values)))
    return values > 127


def binary_values_problem(values) -> str:
    """Why a mask holding ``values`` (some in 1..127, and not only 0/1) is refused under
    the binary table, and the class-table fix."""
    shown = _format_values(values)
    return (f"mask values {shown} are not a binary tumour mask (0/1 or 0/255): with the default "
            f"binary classes their meaning is ambiguous (1 = tumour beside 255 = ignore, or a label "
            f"map); give the manifest a class table ({sidecar_path('<manifest>.csv').name}: "
            f"name,value rows such as non-tumour,0 / tumour,1 / ignore,255)")


def _distinct_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer image, chunk by chunk (no full-size copy)."""
    found: set[int] = set()
    flat = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, -1)
    for top in range(0, flat.shape[0], _rows_per_chunk(flat)):
        found.update(np.unique(flat[top:top + _rows_per_chunk(flat)]).tolist())
    return np.array(sorted(found))


def _format_values(values) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:_SHOWN_VALUES])
    return "{" + text + (f", ... ({len(values)} values)" if len(values) > _SHOWN_VALUES else "") + "}"


def _lut(classes: ClassTable) -> np.ndarray:
    lut = np.full(1 << 16, -1, np.int16)  # pixel value -> label, -1 = not in the table
    for value, label in classes.value_map().items():
        lut[value] = label
    return lut


def _map_labels(values: np.ndarray, classes: ClassTable, path: Path, lut: np.ndarray | None = None) -> np.ndarray:
    """uint8 label map of ``values`` through ``classes``, row chunk by row chunk."""
    if values.dtype == bool:
        values = values.view(np.uint8)
    if not np.issubdtype(values.dtype, np.integer):
        raise AnnotationError(path, f"label map must hold integer values, got {values.dtype}")
    lut = _lut(classes) if lut is None else lut
    labels = np.empty(values.shape, np.uint8)
    bad: set[int] = set()
    chunk = _rows_per_chunk(values)
    for top in range(0, values.shape[0], chunk):
        block = values[top:top + chunk]
        if block.dtype.itemsize > 2 or np.issubdtype(block.dtype, np.signedinteger):
            outside = (block < 0) | (block > 0xFFFF)
            if outside.any():
                bad.update(np.unique(block[outside]).tolist())
                block = np.where(outside, 0, block)
            block = block.astype(np.uint16)
        mapped = lut[block]
        unknown = mapped < 0
        if unknown.any():
            bad.update(np.unique(block[unknown]).tolist())
        labels[top:top + chunk] = mapped
    if bad:
        listed = "; ".join(f"{e.name}={'/'.join(map(str, e.values))}" for e in classes.entries)
        ignore = f"; ignore={'/'.join(map(str, classes.ignore))}" if classes.ignore else ""
        raise AnnotationError(path, f"mask values {_format_values(sorted(bad))} are not in the "
                                    f"class table ({listed}{ignore})")
    return labels


# ==================================================================== loading
def native_downsample(mask_size: tuple[int, int], dimensions: tuple[int, int], preferred: float) -> float | None:
    """The downsample at which a ``mask_size`` = (w, h) raster covers a slide of level-0
    ``dimensions``: its size must be the slide's / downsample rounded down or up in both
    directions.  ``preferred`` (the grid asked for) wins when it fits; None when no
    downsample >= 1 fits."""
    (mw, mh), (width, height) = mask_size, dimensions
    if mw < 1 or mh < 1:
        return None

    def fits(d: float) -> bool:
        return (d >= 1 - 1e-9 and mw in (math.floor(width / d), math.ceil(width / d))
                and mh in (math.floor(height / d), math.ceil(height / d)))

    for d in (preferred, float(round(width / mw)), width / mw, height / mh):
        if d > 0 and fits(d):
            return float(d)
    return None


_PARSED: OrderedDict = OrderedDict()  # (path, size, mtime) -> PolygonFile: files parsed once per process
_PARSED_KEEP = 8
_LOGGED: set = set()


def _read_polygons_cached(path: Path):
    from h2g.io.polygons import read_polygons

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _PARSED:
        _PARSED.move_to_end(key)
        return _PARSED[key]
    parsed = read_polygons(path)
    _PARSED[key] = parsed
    while len(_PARSED) > _PARSED_KEEP:
        _PARSED.popitem(last=False)
    return parsed


def _log_once(level: int, path: Path, text: str) -> None:
    key = (str(path), text)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, "%s: %s", path, text)


def load_annotation(path, slide, downsample: float = 4.0, classes: ClassTable | None = None, *,
                    required: bool = False) -> Annotation:
    """Read the annotation at ``path`` (raster or polygons, see the module doc) for
    ``slide`` (anything with ``dimensions`` and ``path``: an :class:`h2g.io.slide.Slide`)
    with labels on the grid of ``downsample`` level-0 px, names and values read through
    ``classes`` (default: the binary tumour table).

    Errors (:class:`AnnotationError`, naming the file): not found, unreadable or
    malformed; a raster whose size covers the slide at no downsample; values or class
    names the table does not know; polygons beyond 1.5x the slide's extent or all
    outside it; with ``required`` (a test slide), no usable polygon.  Warnings (what was
    skipped, repaired or clipped; an unannotated slide) go to this module's logger once
    per file."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    classes = BINARY if classes is None else classes
    from h2g.io.polygons import sniff

    try:
        kind = sniff(path)
    except OSError as exc:
        raise AnnotationError(path, f"cannot read the annotation: {exc}") from None
    if kind is None:
        annotation = Annotation(None, downsample, path, source=_raster_source(path, slide, downsample, classes))
    else:
        source = PolygonSource(_read_polygons_cached(path), slide.dimensions, classes)
        annotation = Annotation(None, downsample, path, source=source)
        for text in source.warnings:
            _log_once(logging.WARNING, path, text)
        if source.non_tumour:
            listed = ", ".join(f"{name!r} ({n} polygon(s))" for name, n in sorted(source.non_tumour.items()))
            _log_once(logging.INFO, path, f"read as non-tumour (binary classes): {listed}")
        if source.empty:
            what = "all non-tumour" if classes.is_binary else "no labelled pixel"
            if required:
                raise AnnotationError(path, f"no annotated polygon ({source.format_name}): a slide that is scored "
                                            "(a test slide) needs its annotation")
            _log_once(logging.WARNING, path, f"no annotated polygon: an unannotated slide ({what})")
    return annotation


def _raster_source(path: Path, slide, downsample: float, classes: ClassTable) -> RasterSource:
    from h2g.io.masks import open_mask_image

    try:
        image = open_mask_image(path)
    except AnnotationError as exc:
        from h2g.io.polygons import has_image_signature

        if "cannot read the mask image" in str(exc) and not has_image_signature(path):
            raise AnnotationError(path, "cannot read the annotation: not a mask image (PNG, TIFF) nor a polygon "
                                        "annotation (QuPath GeoJSON, ASAP XML, Aperio ImageScope XML)") from None
        raise
    width, height = slide.dimensions
    mask_w, mask_h = image.size
    native = native_downsample((mask_w, mask_h), (width, height), downsample)
    if native is None:
        image.close()
        want = f"{round(width / downsample)}x{round(height / downsample)}"
        raise AnnotationError(
            path, f"mask is {mask_w}x{mask_h} px but slide {slide.path} ({width}x{height}) at downsample "
                  f"{downsample:g} needs {want} px, and the mask covers the slide at no downsample (its width "
                  f"gives {width / mask_w:.4g} level-0 px per pixel, its height {height / mask_h:.4g})")
    level0 = image.levels[0]
    if level0.nbytes > IN_MEMORY_BYTES and len(image.levels) and hasattr(level0, "tiled"):
        return RasterSource(path, (width, height), classes, native, image=image)
    try:
        values = level0.read_all()
    except (OSError, ValueError) as exc:
        raise AnnotationError(path, f"cannot read the mask image: {exc}") from None
    finally:
        image.close()
    if classes is BINARY or classes == BINARY:
        mask = _binarise(values, path)
        labels = mask.view(np.uint8)
        labels.flags.writeable = False
        return RasterSource(path, (width, height), classes, native, labels=labels, mask=mask)
    return RasterSource(path, (width, height), classes, native, labels=_map_labels(values, classes, path))

