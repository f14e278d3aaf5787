"""Sliding-window segmentation of a slide with multi-view feeds, stitched into a Raster.

:func:`sliding_segmentation` runs a segmentation model (per-pixel class probabilities
``(B, o, o, C)``) over a slide:

1. windows over the tissue (:func:`h2g.tiling.windows.window_grid`): one per ``stride``
   x ``stride`` cell of the output raster whose footprint has tissue;
2. for each window, every view the model takes (:class:`h2g.data.views.View`: DMMN's
   20x / 10x / 5x, m-UNet's two levels, ...) read around the window's centre with
   :func:`h2g.data.views.read_views` (beyond the slide: reflection padding), in batches
   on the shared reader pool (:func:`h2g.data.readers.reader_pool`) while the backend
   predicts the previous batches;
3. each prediction put back on the output raster and the overlaps blended.

Geometry.  The model's output pixel grid covers its *target* view (the first view unless
named): an output of ``o`` px for a target view of ``s`` px at magnification ``m`` is a
raster at ``m * o / s``.  ``stride`` and ``keep`` are given in target-view pixels (DMMN:
target 20x, 256 px, stride 256) and must map to whole raster pixels.

Blending (``blend``), a weighted average ``sum_w w P / sum_w w`` of the predictions ``P``
landing on a raster pixel, with per-window weights (:func:`blend_weights`):

- ``"centre"`` (default; DMMN's rule): weight 1 on the central ``keep`` x ``keep`` pixels
  of each prediction (default ``keep`` = ``stride``: the kept centres tile the raster
  exactly, each pixel gets one prediction), 0 on the rest;
- ``"tent"``: the separable linear tent ``w(i) w(j)`` with
  ``w(i) = 1 - |2 (i + 0.5) / o - 1|`` (highest at the centre, falling linearly to
  ``1 / o`` at the border), so overlapping windows (``stride`` < size) cross-fade and a
  prediction's borders, which saw the least context, count least.

Raster pixels no window reached (glass) are not ``covered`` and have probability 0.

TensorFlow-free.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from h2g.core.choices import Choice
from h2g.core.errors import ConfigError, ExportError
from h2g.data.views import View, check_views, read_views
from h2g.inference.backends import Backend
from h2g.inference.raster import Raster, raster_shape

#: rows of the raster :meth:`Stitcher.result` normalises at a time (bounds its temporaries)
RESULT_ROWS = 512


class Blend(Choice):
    """How overlapping window predictions combine (module doc)."""

    CENTRE = "centre"
    TENT = "tent"


BLENDS = Blend.values()


def blend_weights(size: int, blend: str = "centre", keep: int | None = None) -> np.ndarray:
    """``(size, size)`` float32 weight of each output pixel of a window (module doc)."""
    size = int(size)
    blend = Blend.parse(blend, "blend")
    if blend == Blend.CENTRE:
        keep = size if keep is None else int(keep)
        if not 1 <= keep <= size:
            raise ConfigError(f"keep must be in 1..{size} output px, got {keep}")
        start = (size - keep) // 2
        line = np.zeros(size, np.float32)
        line[start:start + keep] = 1.0
    else:
        line = (1.0 - np.abs(2.0 * (np.arange(size) + 0.5) / size - 1.0)).astype(np.float32)
    return np.outer(line, line).astype(np.float32)


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks of the first two axes of ``(h, w, ...)``
    (``h`` and ``w`` multiples of ``factor``)."""
    if factor == 1:
        return values
    h, w = values.shape[:2]
    blocks = values.reshape(h // factor, factor, w // factor, factor, *values.shape[2:])
    return blocks.mean(axis=(1, 3), dtype=np.float32)


class Stitcher:
    """Weighted average of window predictions on a ``(rows, cols)`` raster.

    ``factor`` > 1 stitches onto a raster ``factor`` times coarser than the windows'
    output grid: each window's weighted prediction and its weights are averaged over
    ``factor`` x ``factor`` blocks first, so every coarse pixel is the weighted mean of
    the fine predictions it covers (window sizes and positions must be multiples of
    ``factor``)."""

    def __init__(self, shape: tuple[int, int], classes: int, weights: np.ndarray, factor: int = 1):
        self.shape = tuple(shape)
        self.factor = int(factor)
        self.sum = np.zeros(self.shape + (int(classes),), np.float32)
        self.weight = np.zeros(self.shape, np.float32)
        self.fine_weights = np.asarray(weights, np.float32)
        self.weights = block_mean(self.fine_weights, self.factor)
        self._result = None  # (probs, covered) once result() has run

    def add(self, top_left: tuple[int, int], probs: np.ndarray) -> None:
        """Add one ``(o, o, C)`` prediction whose top-left pixel of the windows' output grid
        is ``(row, col)`` (it may hang over the raster's edges: that part is dropped)."""
        if self._result is not None:
            raise RuntimeError("Stitcher.add after result(): the sums were divided in place")
        if self.factor > 1:
            f = self.factor
            if top_left[0] % f or top_left[1] % f or probs.shape[0] % f:
                raise ConfigError(f"a window at {tuple(top_left)} of {probs.shape[0]} px is not on the raster's "
                                  f"{f} px blocks")
            weighted = block_mean(self.fine_weights[..., None] * probs, f)
            self._add(int(top_left[0]) // f, int(top_left[1]) // f, weighted, self.weights, weighted_already=True)
            return
        self._add(int(top_left[0]), int(top_left[1]), probs, self.weights)

    def _add(self, r0: int, c0: int, probs: np.ndarray, weights: np.ndarray, weighted_already: bool = False) -> None:
        h, w = probs.shape[:2]
        rs, cs = max(0, -r0), max(0, -c0)
        re, ce = min(h, self.shape[0] - r0), min(w, self.shape[1] - c0)
        if re <= rs or ce <= cs:
            return
        wts = weights[rs:re, cs:ce]
        part = probs[rs:re, cs:ce] if weighted_already else wts[..., None] * probs[rs:re, cs:ce]
        self.sum[r0 + rs:r0 + re, c0 + cs:c0 + ce] += part
        self.weight[r0 + rs:r0 + re, c0 + cs:c0 + ce] += wts

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(probs (rows, cols, C), covered (rows, cols))``: ``sum / weight`` where a
        window reached (``weight > 0``), 0 elsewhere.

        The sums are divided in place (the stitcher is spent afterwards: no second
        raster-sized array), band by band of :data:`RESULT_ROWS` rows, by the weights
        with 1 put where nothing was covered, so the division runs over contiguous
        memory without a mask.  Each covered value is the same IEEE division as
        ``sum[covered] / weight[covered]``, so the result equals that formula to the bit
        (tested), at a fraction of its time (boolean-mask gathers and scatters of the
        whole raster were a quarter of a small zoom run).  A band whose covered weights
        are all 1 (blend ``centre`` with ``keep`` = stride: each pixel from one window)
        is not divided (``x / 1 = x``), and uncovered pixels are only written where their
        sum is not already +0.0 (a zero-weight margin times a negative or NaN
        prediction): pages of a slide-wide raster that no window touched stay unwritten,
        so its resident memory stays that of the tissue's windows."""
        if self._result is None:
            covered = self.weight > 0
            for top in range(0, self.shape[0], RESULT_ROWS):
                band = slice(top, top + RESULT_ROWS)
                sums, weight, hit = self.sum[band], self.weight[band], covered[band]
                if not np.logical_or(weight == 1, ~hit).all():
                    np.divide(sums, np.where(hit, weight, np.float32(1))[..., None], out=sums)
                stray = ~hit[..., None] & (sums.view(np.uint32) != 0)  # uncovered, not +0.0
                if stray.any():
                    np.copyto(sums, np.float32(0), where=stray)
            self._result = self.sum, covered
        return self._result


def memory_budget() -> int:
    """Bytes a class raster may take: half this machine's physical memory (a slide-wide
    float32 raster of several classes outgrows it long before the disk does)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def raster_stitcher(extent: tuple[int, int], downsample: float, classes: int, weights: np.ndarray, *,
                    window: int, stride: int, offset: int, factor: int = 1, source: str = "the model",
                    budget: int | None = None) -> tuple[Raster, Stitcher]:
    """The empty raster a sliding or zoom segmentation stitches into, ``factor`` times
    coarser than the windows' output grid (``downsample`` level-0 px per output px), and
    its :class:`Stitcher`.  :class:`ConfigError` when ``factor`` does not divide the
    window, the stride and the windows' offset, or when the raster (its float32 sums and
    weights) would take more than ``budget`` bytes (default :func:`memory_budget`): the
    message gives the size and the factor that fits."""
    factor = int(factor)
    if factor < 1:
        raise ConfigError(f"raster downsample must be >= 1, got {factor}")
    for value, what in ((window, "window"), (stride, "stride"), (offset, "windows' offset")):
        if value % factor:
            raise ConfigError(f"raster downsample {factor} must divide the {what} ({value} output px)")
    budget = memory_budget() if budget is None else budget
    rows, cols = raster_shape(extent, downsample * factor)
    need = rows * cols * (classes + 1) * 4
    if need > budget:
        fits = next((f for f in range(factor, window + 1) if not window % f and not stride % f and not offset % f
                     and need * factor ** 2 / f ** 2 <= budget), None)
        hint = f"; give --raster-downsample {fits}" if fits else "; the windows cannot be pooled enough"
        raise ConfigError(f"{source}: a {cols} x {rows} x {classes} class raster at downsample "
                          f"{downsample * factor:g} needs {need / 2**30:.1f} GiB, more than half of this machine's "
                          f"memory ({budget / 2**30:.1f} GiB){hint}")
    raster = Raster.empty(extent, downsample * factor, classes)
    return raster, Stitcher(raster.shape, classes, weights, factor)


def _whole(value: float, what: str) -> int:
    if abs(value - round(value)) > 1e-6 or round(value) < 1:
        raise ConfigError(f"{what} must map to a whole number of output pixels, got {value:g}")
    return int(round(value))


def read_window_batch(slide, centres: np.ndarray, views: Sequence[View]) -> dict[str, np.ndarray]:
    """Every view of every window around ``centres`` as float32 in [0, 1]."""
    out = {v.name: np.empty((len(centres), v.size, v.size, 3), np.float32) for v in views}
    for i, (x, y) in enumerate(centres):
        for name, image in read_views(slide, (float(x), float(y)), views).items():
            np.multiply(image, np.float32(1 / 255), out=out[name][i])
    return out


def feed_for(backend: Backend, batch: dict[str, np.ndarray]):
    """The batch as the backend takes it: by name, or the one array of a one-input model."""
    if len(backend.input_names) == 1 and len(batch) == 1:
        return next(iter(batch.values()))
    if set(backend.input_names) != set(batch):
        raise ExportError(f"{backend.source}: the model's inputs {list(backend.input_names)} are not "
                          f"the views {list(batch)}")
    return batch


def _probe(backend: Backend, views: Sequence[View]) -> tuple[int, int]:
    """Output side and class count of ``backend`` for one window (an all-zero feed)."""
    out = backend.predict(feed_for(backend, {v.name: np.zeros((1, v.size, v.size, 3), np.float32)
                                               for v in views}))
    if out.ndim != 4 or out.shape[1] != out.shape[2] or out.shape[-1] < 1:
        raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} is not (1, o, o, classes) "
                          "per-pixel class probabilities of a segmentation model")
    return int(out.shape[1]), int(out.shape[-1])


@dataclass(frozen=True)
class WindowPlan:
    """Where :func:`sliding_segmentation` puts its windows: the window ``grid`` (on the
    output raster's pixel grid), the model's output side ``out_size`` and ``classes``, and
    ``keep`` (raster px kept per window with blend ``centre``, else None)."""

    grid: object  # h2g.tiling.windows.WindowGrid
    out_size: int
    classes: int
    keep: int | None


def plan_windows(slide, backend: Backend, views: Sequence[View], target_view: View, *, stride: int | None = None,
                 keep: int | None = None, blend: str = "centre", tissue=None,
                 tissue_threshold: float = 0.0) -> WindowPlan:
    """The windows ``backend`` fed ``views`` runs over ``slide`` (see the module doc's
    geometry): probes the model once for its output size; ``tissue`` default: detected."""
    from h2g.tiling.tissue import detect_tissue
    from h2g.tiling.windows import window_grid

    out_size, classes = _probe(backend, views)
    scale = out_size / target_view.size  # raster px per target-view px
    stride_o = _whole((stride or target_view.size) * scale, f"stride {stride or target_view.size}")
    keep_o = _whole((keep or stride or target_view.size) * scale, f"keep {keep}") if blend == Blend.CENTRE else None
    if tissue is None:
        tissue = detect_tissue(slide)
    grid = window_grid(slide, magnification=target_view.magnification * scale, size=out_size,
                       stride=stride_o, tissue=tissue, tissue_threshold=tissue_threshold)
    return WindowPlan(grid, out_size, classes, keep_o)


def sliding_segmentation(slide, backend: Backend, views: Sequence[View], *, target: str | None = None,
                         stride: int | None = None, keep: int | None = None, blend: str = "centre",
                         tissue=None, tissue_threshold: float = 0.0, batch_size: int = 8,
                         readers: int = 2, progress: bool = True, timings: dict | None = None,
                         raster_downsample: int = 1) -> Raster:
    """Segment ``slide`` with ``backend`` fed ``views`` (see the module doc); returns the
    :class:`Raster` of class probabilities over the slide.  ``stride`` (default: the
    target view's size) and ``keep`` (default: ``stride``) are target-view pixels;
    ``raster_downsample``: the raster is that many times coarser than the model's output
    (each window's prediction averaged over blocks: :func:`raster_stitcher`).

    ``timings`` receives seconds: ``tissue`` (mask + windows), ``reading`` (readers' busy
    time, summed), ``inference``, ``waiting`` (inference idle), ``window_pipeline`` (wall),
    ``stitching``; and ``windows`` (count)."""
    from tqdm.auto import tqdm

    from h2g.data.readers import reader_pool

    views = check_views(views)
    names = [v.name for v in views]
    target_view = views[names.index(target)] if target in names else views[0]
    if target is not None and target not in names:
        raise ConfigError(f"target view {target!r} is not one of the views {names}")
    if batch_size < 1 or readers < 1:
        raise ConfigError(f"batch_size and readers must be >= 1, got {batch_size} and {readers}")
    t0 = time.perf_counter()
    plan = plan_windows(slide, backend, views, target_view, stride=stride, keep=keep, blend=blend, tissue=tissue,
                        tissue_threshold=tissue_threshold)
    grid, out_size, classes = plan.grid, plan.out_size, plan.classes
    weights = blend_weights(out_size, blend, plan.keep)
    raster, stitcher = raster_stitcher(slide.dimensions, grid.downsample, classes, weights, window=out_size,
                                       stride=grid.stride, offset=(grid.size - grid.stride) // 2,
                                       factor=raster_downsample, source=backend.source)
    t1 = time.perf_counter()

    lock = threading.Lock()
    busy = [0.0]

    def read(start: int) -> dict[str, np.ndarray]:
        tr = time.perf_counter()
        try:
            return read_window_batch(slide, grid.centres[start:start + batch_size], views)
        finally:
            with lock:
                busy[0] += time.perf_counter() - tr

    pool = reader_pool(readers)
    starts = iter(range(0, len(grid), batch_size))
    pending: deque = deque()

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append((start, pool.submit(read, start)))

    inference = waiting = stitching = 0.0
    try:
        for _ in range(2 * readers):
            submit()
        with tqdm(total=len(grid), unit="window", desc="windows", disable=not progress, leave=False) as bar:
            while pending:
                start, future = pending.popleft()
                tw = time.perf_counter()
                batch = future.result()
                ti = time.perf_counter()
                waiting += ti - tw
                submit()
                out = backend.predict(feed_for(backend, batch))
                ts = time.perf_counter()
                inference += ts - ti
                if out.shape[1:] != (out_size, out_size, classes):
                    raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} for a batch, "
                                      f"expected (b, {out_size}, {out_size}, {classes})")
                for k, probs in enumerate(out):
                    stitcher.add(grid.top_left[start + k], probs)
                stitching += time.perf_counter() - ts
                bar.update(len(out))
    finally:
        for _, future in pending:
            future.cancel()
    t2 = time.perf_counter()
    raster.probs, raster.covered = stitcher.result()
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(tissue=t1 - t0, reading=busy[0], inference=inference, waiting=waiting,
                       window_pipeline=t2 - t1, stitching=stitching + t3 - t2, windows=len(grid))
    return raster
