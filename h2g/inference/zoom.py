"""RAZN's conditional zoom inference (Dong et al., Section 2, m = 1, r = 2) over a slide,
with any backends (Keras, ONNX Runtime, OpenVINO): the code the training pipeline
evaluates with and deployment runs.

Regions tile the slide's tissue on the *fine* grid: one window of rS px at ``r m0``
(:func:`h2g.tiling.windows.window_grid`, stride rS) per region, the same field as ``x0``,
S px at ``m0``, around the same centre (:class:`h2g.data.views.View` keeps views of one
centre co-centred).  Per region:

1. the policy network reads ``x0`` and gives ``p``, the probability of zooming in;
2. ``p > threshold`` (default 0.5: the more likely action of the policy, also of the
   bounded Bernoulli since ``p~ > 0.5`` iff ``p > 0.5`` for alpha > 0.5): ``x1`` (rS px
   at ``r m0``) is read on demand, cut into r^2 patches of S px (:func:`split_zoom`),
   segmented by the fine network and put back (:func:`stitch_zoom`); otherwise the
   coarse network segments ``x0`` and its prediction is enlarged x r by nearest
   neighbour (:func:`enlarge`: coarse pixel (u, v) covers fine pixels r u .. r u + r - 1);
3. the region's rS x rS prediction is stitched into the slide's
   :class:`~h2g.inference.raster.Raster` (downsample of ``r m0``).

Every region's decision is kept (:class:`ZoomStats`: the fraction zoomed);
:func:`time_interleaved` times regions one at a time for the paper's relative inference
time.

TensorFlow-free (the Keras twins of the geometry are in :mod:`h2g.models.razn`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.data.views import View
from h2g.inference.backends import Backend
from h2g.inference.raster import Raster
from h2g.inference.sliding import blend_weights, raster_stitcher, read_window_batch

ZOOM_RATE = 2
ROLES = ("policy", "coarse", "fine")


def bounded_bernoulli(p, alpha: float = 0.8):
    """Eq. 5: ``p~ = alpha p + (1 - alpha)(1 - p)``, in ``[1 - alpha, alpha]`` for p in [0, 1]."""
    if not 0.5 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0.5, 1], got {alpha}")
    return alpha * p + (1.0 - alpha) * (1.0 - p)


def split_zoom(x: np.ndarray, rate: int = ZOOM_RATE) -> np.ndarray:
    """(B, rS, rS, C) -> (B r^2, S, S, C); quadrant (i, j) of sample b at ``b r^2 + i r + j``."""
    b, h, w, c = x.shape
    if h != w or h % rate:
        raise ConfigError(f"a zoomed region must be square with a side divisible by {rate}, got {h}x{w}")
    s = h // rate
    return x.reshape(b, rate, s, rate, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * rate * rate, s, s, c)


def stitch_zoom(x: np.ndarray, rate: int = ZOOM_RATE) -> np.ndarray:
    """The inverse of :func:`split_zoom`: (B r^2, S, S, C) -> (B, rS, rS, C)."""
    n, s, _, c = x.shape
    b = n // (rate * rate)
    return x.reshape(b, rate, rate, s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, rate * s, rate * s, c)


def enlarge(x: np.ndarray, rate: int = ZOOM_RATE) -> np.ndarray:
    """Coarse (B, S, S, C) -> (B, rS, rS, C), nearest neighbour."""
    return np.repeat(np.repeat(x, rate, axis=1), rate, axis=2)


def zoom_views(size: int, magnification: float, rate: int = ZOOM_RATE) -> tuple[View, View]:
    """``x0`` (``size`` px at ``magnification``) and ``x1`` (``rate`` x that at ``rate`` x the magnification)."""
    return View("x0", float(magnification), int(size)), View("x1", float(magnification) * rate, int(size) * rate)


@dataclass
class ZoomStats:
    """Per region (in the region grid's order): ``p`` (the policy's zoom probability),
    ``zoomed`` (bool) and ``top_left`` (row, col) of the region on the raster's grid,
    whose regions are ``size`` raster px a side."""

    p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    zoomed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    top_left: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    size: int = 0

    def zoom_map(self, shape: tuple[int, int]) -> np.ndarray:
        """``shape`` (the raster's) float map: 1 on zoomed regions, 0 on the others, NaN
        where there is no region."""
        out = np.full(shape, np.nan, np.float32)
        for (r, c), z in zip(self.top_left, self.zoomed):
            out[max(r, 0):r + self.size, max(c, 0):c + self.size] = float(z)
        return out

    @property
    def zoom_fraction(self) -> float:
        return float(self.zoomed.mean()) if len(self.zoomed) else 0.0

    def to_dict(self) -> dict:
        return {"regions": int(len(self.zoomed)), "zoomed": int(self.zoomed.sum()),
                "zoom_fraction": self.zoom_fraction}


def _probability(out: np.ndarray, source: str) -> np.ndarray:
    out = np.asarray(out, np.float32)
    if out.ndim != 2 or out.shape[1] != 1:
        raise ExportError(f"{source}: a policy network outputs (B, 1) zoom probabilities, got {out.shape}")
    return out[:, 0]


def segment_regions(policy: Backend, coarse: Backend, fine: Backend, x0: np.ndarray, x1_reader,
                    threshold: float = 0.5, rate: int = ZOOM_RATE,
                    timings: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch of regions: ``x0`` (B, S, S, 3) in [0, 1]; ``x1_reader(indices)`` reads
    the zoomed views (k, rS, rS, 3) of the regions that zoom.  Returns ``(probs (B, rS,
    rS, C), p (B,), zoomed (B,))``; ``timings`` (when given) accumulates the seconds of
    ``policy``, ``coarse`` and ``fine`` (reading excluded)."""
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    p = _probability(policy.predict(x0), policy.source)
    t["policy"] = t.get("policy", 0.0) + time.perf_counter() - t0
    zoomed = p > threshold
    out = None
    for branch, idx in (("coarse", np.flatnonzero(~zoomed)), ("fine", np.flatnonzero(zoomed))):
        if not len(idx):
            continue
        if branch == "fine":
            patches = split_zoom(np.asarray(x1_reader(idx), np.float32), rate)
            tb = time.perf_counter()
            pred = stitch_zoom(np.asarray(fine.predict(patches), np.float32), rate)
        else:
            tb = time.perf_counter()
            pred = enlarge(np.asarray(coarse.predict(x0[idx]), np.float32), rate)
        t[branch] = t.get(branch, 0.0) + time.perf_counter() - tb
        expected = rate * x0.shape[1]
        if pred.shape[1:3] != (expected, expected):
            raise ExportError(f"{(fine if branch == 'fine' else coarse).source}: predictions of {pred.shape[1]} px "
                              f"for regions of {expected} px on the fine grid")
        if out is None:
            out = np.empty((len(x0),) + pred.shape[1:], np.float32)
        out[idx] = pred
    return out, p, zoomed


def zoom_segmentation(slide, policy: Backend, coarse: Backend, fine: Backend, *, size: int,
                      magnification: float, threshold: float = 0.5, tissue=None, tissue_threshold: float = 0.0,
                      batch_size: int = 8, progress: bool = True, timings: dict | None = None,
                      rate: int = ZOOM_RATE, raster_downsample: int = 1) -> tuple[Raster, ZoomStats]:
    """RAZN over ``slide`` (module doc): regions of ``size`` px at ``magnification``;
    returns the class-probability raster (at ``rate * magnification``) and the regions'
    :class:`ZoomStats`.  ``timings`` receives seconds: ``tissue``, ``reading`` (x0 and
    the zoomed x1), ``policy``, ``coarse``, ``fine``, ``stitching``, ``total``; and
    ``regions``, ``zoomed``."""
    from tqdm.auto import tqdm

    from h2g.tiling.tissue import detect_tissue
    from h2g.tiling.windows import window_grid

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    v0, v1 = zoom_views(size, magnification, rate)
    t0 = time.perf_counter()
    if tissue is None:
        tissue = detect_tissue(slide)
    grid = window_grid(slide, magnification=v1.magnification, size=v1.size, stride=v1.size, tissue=tissue,
                       tissue_threshold=tissue_threshold)
    stitcher = raster = None
    t = dict.fromkeys(("reading", "policy", "coarse", "fine", "stitching"), 0.0)
    stats = ZoomStats(np.zeros(len(grid), np.float32), np.zeros(len(grid), bool),
                      np.asarray(grid.top_left, np.int64).reshape(-1, 2), v1.size)
    tissue_s = time.perf_counter() - t0
    with tqdm(total=len(grid), unit="region", desc="regions", disable=not progress, leave=False) as bar:
        for start in range(0, len(grid), batch_size):
            centres = grid.centres[start:start + batch_size]
            tr = time.perf_counter()
            x0 = read_window_batch(slide, centres, [v0])["x0"]
            t["reading"] += time.perf_counter() - tr

            def read_x1(indices):
                tx = time.perf_counter()
                try:
                    return read_window_batch(slide, centres[indices], [v1])["x1"]
                finally:
                    t["reading"] += time.perf_counter() - tx

            out, p, zoomed = segment_regions(policy, coarse, fine, x0, read_x1, threshold, rate, timings=t)
            ts = time.perf_counter()
            if stitcher is None:
                raster, stitcher = raster_stitcher(slide.dimensions, grid.downsample, out.shape[-1],
                                                   blend_weights(v1.size), window=v1.size, stride=v1.size, offset=0,
                                                   factor=raster_downsample, source=coarse.source)
            for k, probs in enumerate(out):
                stitcher.add(grid.top_left[start + k], probs)
            t["stitching"] += time.perf_counter() - ts
            stats.p[start:start + len(x0)] = p
            stats.zoomed[start:start + len(x0)] = zoomed
            bar.update(len(x0))
    if raster is None:  # no region over tissue
        n = _classes_of(coarse, v0)
        raster = Raster.empty(slide.dimensions, grid.downsample * raster_downsample, n)
    else:
        ts = time.perf_counter()
        raster.probs, raster.covered = stitcher.result()
        t["stitching"] += time.perf_counter() - ts
    if timings is not None:
        timings.update(tissue=tissue_s, **t, total=time.perf_counter() - t0, regions=len(grid),
                       zoomed=int(stats.zoomed.sum()))
    return raster, stats


def _classes_of(backend: Backend, view: View) -> int:
    return int(backend.predict(np.zeros((1, view.size, view.size, 3), np.float32)).shape[-1])


def time_interleaved(calls, n: int, repeats: int = 5) -> np.ndarray:
    """``(len(calls), n)`` wall seconds of ``calls[k](i)`` for items ``i < n``, the best of
    ``repeats``; the calls are interleaved item by item, so a change of machine load
    touches every call alike (the relative inference time divides them)."""
    out = np.full((len(calls), n), np.inf)
    for i in range(n):
        for _ in range(repeats):
            for k, call in enumerate(calls):
                t0 = time.perf_counter()
                call(i)
                out[k, i] = min(out[k, i], time.perf_counter() - t0)
    return out
