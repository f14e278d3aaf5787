"""RAZN's deployed segmenter: the policy, coarse and fine networks running the conditional
zoom (:func:`h2g.inference.zoom.zoom_segmentation`) over a slide.  The same object serves
``export/segment_slide.py POLICY COARSE FINE``, the cohort runner, the benchmark, the int8
guard and the training pipeline's test slides (Keras backends).  A RAZN baseline (Scale 1,
Scale 2, MS, Attention) is one network with views and runs on
:class:`h2g.inference.segmenter.SlidingSegmenter`.  TensorFlow-free."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from h2g.core.errors import ConfigError, ExportError
from h2g.inference.segmenter import (
    RasterSegmentation,
    RasterSegmenter,
    SegmentOptions,
    pick,
    read_picks,
    window_candidates,
)
from h2g.inference.zoom import ROLES, ZOOM_RATE, split_zoom, zoom_views

log = logging.getLogger("h2g")


@dataclass(frozen=True)
class ZoomOptions(SegmentOptions):
    """RAZN's settings: the policy's zoom ``threshold`` (default: the metadata's, 0.5).
    Region size and magnification come from the networks' metadata."""

    threshold: float | None = None
    raster_downsample: int = 1  # the class raster that many times coarser than the fine grid

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"zoom threshold must be in [0, 1], got {self.threshold}")


def geometry(metadata) -> tuple[int, float, float]:
    """``(size, magnification, threshold)`` from a RAZN network's metadata."""
    extras = metadata.extras
    try:
        return int(extras["size"]), float(extras["magnification"]), float(extras.get("threshold", 0.5))
    except KeyError as exc:
        raise ExportError(f"RAZN metadata without {exc}: export the models with export/convert.py") from None


class ZoomSegmenter(RasterSegmenter):
    """RAZN's conditional zoom over a slide (see the module doc)."""

    label = "RAZN's conditional zoom"
    roles = required = ROLES
    main_role = "coarse"
    Options = ZoomOptions
    default_batch = 8
    unit = "regions"
    stages = ("tissue", "reading", "policy", "coarse", "fine", "stitching", "total")
    stage_labels = {
        "tissue": "tissue detection (+ region grid)",
        "reading": "reading x0, and x1 of the zoomed regions",
        "policy": "policy network",
        "coarse": "coarse network (regions not zoomed)",
        "fine": "fine network (zoomed regions, 4 patches each)",
        "stitching": "stitching (+ the raster's weighted average)",
        "total": "total",
    }
    pipeline_stage = "total"
    headline = ()

    def __init__(self, backends, options=None, metadata=None):
        super().__init__(backends, options, metadata)
        meta = self.metadata["coarse"]
        if meta is None:
            raise ExportError(f"{self.backends['coarse'].source}: no RAZN metadata (export with export/convert.py)")
        self.size, self.magnification, trained = geometry(meta)
        self.threshold = self.options.threshold if self.options.threshold is not None else trained
        self.views = zoom_views(self.size, self.magnification)
        self.shown = meta.replace(views=self.views)

    @classmethod
    def accepts(cls, metas):
        return (set(metas) == set(ROLES) and all(m is not None and m.system == "razn" for m in metas.values()))

    def segment(self, slide, *, tissue=None, progress=False):
        from h2g.inference.zoom import zoom_segmentation

        t0 = time.perf_counter()
        if tissue is None:
            tissue = self.tissue_mask(slide)
        detection = time.perf_counter() - t0
        timings: dict = {}
        b = self.backends
        raster, stats = zoom_segmentation(slide, b["policy"], b["coarse"], b["fine"], size=self.size,
                                          magnification=self.magnification, threshold=self.threshold, tissue=tissue,
                                          batch_size=self.batch_size, progress=progress, timings=timings,
                                          raster_downsample=self.options.raster_downsample)
        timings["tissue"] += detection
        timings["total"] = time.perf_counter() - t0
        timings["zoom_fraction"] = stats.zoom_fraction
        no_tissue = timings["regions"] == 0
        if no_tissue:
            log.warning("%s: no tissue found (no region over tissue); writing empty outputs", slide.path)
        return RasterSegmentation(count=timings["regions"], timings=timings, no_tissue=no_tissue,
                                  tissue=0.0 if no_tissue else tissue.fraction, raster=raster, metadata=self.shown,
                                  zoom=stats)

    def write(self, seg, slide, out_dir, extra=None):
        return super().write(seg, slide, out_dir, extra={"zoom": seg.zoom.to_dict(), **(extra or {})})

    def describe(self, seg):
        return super().describe(seg) + f"; {100 * seg.zoom.zoom_fraction:.0f} % of the regions zoomed"

    def settings(self):
        return {**super().settings(), "size": self.size, "magnification": self.magnification,
                "threshold": self.threshold}

    def setup(self, seg):
        return {"views": [v.to_dict() for v in self.views], "zoomed": int(seg.zoom.zoomed.sum()),
                "zoom_fraction": seg.zoom.zoom_fraction,
                "raster": {"shape": list(seg.raster.shape), "downsample": seg.raster.downsample}}

    def guard_outputs(self, seg):
        return {"pixel": seg.raster.probs, "patch": seg.zoom.p}

    @classmethod
    def calibration_feeds(cls, role, metadata, inputs, records, n, seed, *, models=None):
        """The policy and the coarse network: ``x0`` regions over the training slides'
        tissue; the fine network: the ``S`` px quarters of the regions' zoom ``x1``."""
        from h2g.data.views import read_views

        size, magnification, _ = geometry(metadata)
        x0, x1 = zoom_views(size, magnification)
        candidates = window_candidates(records, x1)  # the regions' grid, as inference tiles it
        name = next(iter(inputs))
        if role in ("policy", "coarse"):
            feeds = read_picks(records, pick(candidates, n, seed),
                               lambda slide, centre: {name: read_views(slide, centre, [x0])["x0"][None]})
            what = f"{len(feeds)} regions x0 ({x0.size}px at {x0.magnification:g}x)"
        elif role == "fine":
            regions = read_picks(records, pick(candidates, max(1, n // ZOOM_RATE ** 2), seed),
                                 lambda slide, centre: read_views(slide, centre, [x1])["x1"][None])
            feeds = [{name: q[None]} for r in regions for q in split_zoom(r, ZOOM_RATE)]
            what = f"{len(feeds)} quarters of {len(regions)} zoomed regions x1 ({x1.size}px at {x1.magnification:g}x)"
        else:
            return super().calibration_feeds(role, metadata, inputs, records, n, seed, models=models)
        return feeds, f"{what} over the tissue of {len(records)} training slides, seed {seed}"

