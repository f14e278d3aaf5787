"""H2G-Net's deployed segmenter: tissue -> patch heatmap -> refinement, written once.

The same chain serves deployment (``export/segment_slide.py``, the cohort runner, the
benchmark, the int8 guard), the training pipeline's heatmaps and test predictions
(:mod:`h2g.systems.h2g.pipeline`, through Keras backends) and the BCSS evaluation of a
finished run (:func:`h2g.systems.h2g.runs.run_segmenter`).

Its models are a patch classifier (role ``patch_classifier``) and a refinement network
(``refinement``), either of which may be absent: a patch classifier alone is a patch-wise
design (its heatmap at the refinement resolution is the prediction), an image-only
refinement network is UNet-LR.  Outputs of :meth:`H2GSegmenter.write` (``S`` = the
refinement size, 1024 by default):

- ``heatmap.npy``: the patch-grid heatmap (rows, cols), one cell per patch stride;
- ``heatmap.png`` / ``segmentation.png``: the heatmap on the slide's extent and the
  segmentation at S x S (grey levels = probability x 255; 255 = tumour);
- ``heatmap.tiff`` / ``segmentation.tiff``: the same maps resized to the slide's aspect
  ratio (long side S), as pyramidal TIFFs whose resolution makes them overlay the slide;
- ``tumour.geojson``: the tumour outline as a FeatureCollection of one "Tumor" annotation
  (Polygon or MultiPolygon, holes kept) in level-0 pixel coordinates (or QuPath's frame
  cropped to the OpenSlide bounds: ``geojson_origin``), which QuPath imports;
- ``summary.json``: timings, backends, patch count, tumour fraction, ``no_tissue``.

A slide without tissue (no patch over tissue) is reported with a warning naming it; its
outputs say so (``"no_tissue": true``, an empty mask) and the refinement network is not run
on an all-zero heatmap.  The mask is ``prob > threshold``, the rule of evaluation
(:func:`h2g.evaluation.metrics.binarise`).  TensorFlow-free.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.core.measure import Timed
from h2g.inference.heatmap import Heatmap
from h2g.inference.lowres import MAX_SIZE, MIN_SIZE
from h2g.inference.segmenter import (
    SegmentOptions,
    Segmentation,
    Segmenter,
    inference_only_seconds,
    pick,
    read_picks,
    resolve,
    slide_mpp,
)

log = logging.getLogger("h2g")
DEFAULT_MAGNIFICATION, DEFAULT_PATCH_SIZE, DEFAULT_SIZE = 10.0, 256, 1024


@dataclass(frozen=True)
class H2GOptions(SegmentOptions):
    """H2G-Net's settings: the patch ``magnification`` and ``patch_size`` (default: the
    patch classifier's metadata; another value needs ``force``), the ``heatmap_stride``
    (px between patch centres; default: the stride the refinement network was trained
    on, from its metadata, else the patch size), the refinement ``size`` (default: the
    refinement network's input size, else 1024), the tissue fraction a patch needs
    (``tissue_threshold``) and the probability ``threshold`` of the mask."""

    magnification: float | None = None
    patch_size: int | None = None
    heatmap_stride: int | None = None
    size: int | None = None
    tissue_threshold: float = 0.25
    threshold: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.size is not None and not MIN_SIZE <= int(self.size) <= MAX_SIZE:
            raise ConfigError(f"refinement size must be from {MIN_SIZE} to {MAX_SIZE} px, got {self.size}")
        if self.patch_size is not None and int(self.patch_size) < 1:
            raise ConfigError(f"patch size must be >= 1, got {self.patch_size}")
        if self.magnification is not None and not self.magnification > 0:
            raise ConfigError(f"magnification must be positive, got {self.magnification}")


def options_from_config(config: dict, **changes) -> H2GOptions:
    """The options a run used, from its config (``Config.to_dict()`` or its
    ``config.json``): patch geometry, heatmap stride / batch / readers, refinement size,
    tissue detection and the evaluation threshold; a setting the config lacks keeps its
    default (the models' metadata then decides)."""
    fields = {"magnification": ("patches", "magnification", float), "patch_size": ("patches", "patch_size", int),
              "heatmap_stride": ("heatmap", "stride", None), "size": ("refine", "size", int),
              "tissue_threshold": ("patches", "tissue_threshold", float),
              "tissue_magnification": ("patches", "tissue_magnification", float),
              "saturation_threshold": ("patches", "saturation_threshold", int),
              "batch_size": ("heatmap", "batch_size", int), "readers": ("heatmap", "readers", int),
              "threshold": ("eval", "threshold", float)}
    values = {}
    for name, (section, key, cast) in fields.items():
        part = config.get(section)
        if isinstance(part, dict) and key in part:
            value = part[key]
            values[name] = value if cast is None or value is None else cast(value)
    values.update(changes)
    return H2GOptions(**values)


@dataclass
class H2GSegmentation(Segmentation):
    """A slide's heatmap and segmentation at the refinement resolution: ``prob`` (S, S)
    over the slide's extent, ``mask`` (``prob > threshold``), the refinement inputs
    ``image`` (S, S, 3) and ``heat`` (S, S, 1); ``heatmap`` None for UNet-LR."""

    heatmap: Heatmap | None = None
    image: np.ndarray | None = None
    heat: np.ndarray | None = None
    mask: np.ndarray | None = None
    threshold: float = 0.5


def mask_area_mm2(mask: np.ndarray, extent: tuple[int, int], mpp: float) -> float:
    """Area in mm^2 of the true pixels of ``mask``, a map stretched over a slide of
    level-0 ``extent`` (w, h) at ``mpp`` microns per pixel."""
    rows, cols = mask.shape
    pixel_um2 = (extent[0] * mpp / cols) * (extent[1] * mpp / rows)
    return float(np.count_nonzero(mask)) * pixel_um2 / 1e6


class H2GSegmenter(Segmenter):
    """H2G-Net over a slide (see the module doc)."""

    label = "H2G-Net"
    roles = ("patch_classifier", "refinement")
    required = ()
    main_role = "patch_classifier"
    Options = H2GOptions
    default_batch = 32
    unit = "patches"
    stages = ("tissue", "reading", "inference", "stitching", "patch_pipeline", "patch_wise", "refinement", "total")
    stage_labels = {
        "tissue": "tissue detection (+ patch grid)",
        "reading": "patch reading (busy s, summed over readers)",
        "inference": "patch inference (busy s)",
        "stitching": "stitching",
        "patch_pipeline": "patch reading + inference (wall, overlapped)",
        "patch_wise": "patch-wise total",
        "refinement": "refinement (inputs + network)",
        "total": "total",
    }
    pipeline_stage = "patch_pipeline"
    headline = (("patch_wise", "Patch-wise"), ("refinement", "Refinement"))

    def __init__(self, backends, options=None, metadata=None):
        super().__init__(backends, options, metadata)
        o = self.options
        self.patch, self.refiner = self.backends.get("patch_classifier"), self.backends.get("refinement")
        if self.patch is not None:
            self.patch.require_inputs(("image",), "patch classifier")
        self.with_heatmap = False
        if self.refiner is not None:
            self.refiner.require_inputs(("image", "heatmap"), "refinement network")
            self.with_heatmap = "heatmap" in self.refiner.input_names
            if self.with_heatmap and self.patch is None:
                raise ExportError(f"{self.refiner.source}: a refinement network with a heatmap input needs its "
                                  "patch classifier")
            if not self.with_heatmap and self.patch is not None:
                raise ExportError(f"{self.refiner.source}: an image-only network (UNet-LR) takes no patch "
                                  "classifier")
        meta = self.metadata.get("patch_classifier")
        view = meta.views[0] if meta is not None and meta.views else None
        source = self.patch.source if self.patch is not None else ""
        self.magnification = float(resolve(o.magnification, view.magnification if view else None,
                                           DEFAULT_MAGNIFICATION, "magnification", source, o.force))
        self.patch_size = int(resolve(o.patch_size, view.size if view else None, DEFAULT_PATCH_SIZE, "patch size",
                                      source, o.force))
        fixed = self.refiner.image_size if self.refiner is not None else None
        self.size = int(resolve(o.size, fixed, DEFAULT_SIZE, "refinement size",
                                self.refiner.source if self.refiner is not None else "", o.force))
        trained = next((m.extras["heatmap_stride"] for m in (self.metadata.get("refinement"), meta)
                        if m is not None and m.extras.get("heatmap_stride") is not None), None)
        stride = o.heatmap_stride if o.heatmap_stride is not None else trained
        if o.heatmap_stride is not None and trained is not None and o.heatmap_stride != trained:
            log.warning("%s: heatmap stride %s overrides the %s the refinement network was trained on",
                        self.refiner.source if self.refiner is not None else source, o.heatmap_stride, trained)
        self.heatmap_stride = None if stride is None else int(stride)

    @classmethod
    def accepts(cls, metas):
        return bool(metas) and set(metas) <= set(cls.roles)

    @classmethod
    def options_for_run(cls, config):
        return options_from_config(config)

    # ------------------------------------------------------------------ the chain
    def heatmap(self, slide, *, tissue=None, progress: bool = False, timings: dict | None = None) -> Heatmap:
        """The patch classifier's tumour heatmap of ``slide``
        (:func:`h2g.inference.heatmap.slide_heatmap`; ``tissue`` default: detected)."""
        from h2g.inference.heatmap import slide_heatmap

        if self.patch is None:
            raise ExportError("no patch classifier: this H2G-Net segmenter makes no heatmap")
        t0 = time.perf_counter()
        if tissue is None:
            tissue = self.tissue_mask(slide)
        detection = time.perf_counter() - t0
        o = self.options
        heatmap = slide_heatmap(slide, self.patch, tissue=tissue, magnification=self.magnification,
                                patch_size=self.patch_size, stride=self.heatmap_stride,
                                tissue_threshold=o.tissue_threshold, batch_size=self.batch_size,
                                readers=o.readers, progress=progress, timings=timings)
        if timings is not None:
            timings["tissue"] += detection
        return heatmap

    def segment(self, slide, *, tissue=None, heatmap: Heatmap | None = None, progress: bool = False):
        """The chain on ``slide``; a given ``heatmap`` (e.g. cached by the training
        pipeline) skips the patch stage.  ``timings``: seconds of tissue, reading,
        inference, waiting, patch_pipeline, stitching (the heatmap's), refinement, total."""
        from h2g.evaluation.metrics import binarise
        from h2g.inference.lowres import refine, refinement_inputs

        timings: dict = {}
        t0 = time.perf_counter()
        if heatmap is None and self.patch is not None:
            heatmap = self.heatmap(slide, tissue=tissue, progress=progress, timings=timings)
        t1 = time.perf_counter()
        image, heat = refinement_inputs(slide, heatmap, size=self.size)
        no_tissue = heatmap is not None and heatmap.n_patches == 0
        if self.refiner is None:
            prob = heat[..., 0]
        elif no_tissue:
            log.warning("%s: no tissue found (no %d px patch at %gx over tissue); writing empty outputs, "
                        "refinement not run", slide.path, self.patch_size, self.magnification)
            prob = np.zeros((self.size, self.size), np.float32)
        else:
            prob = refine(self.refiner, image, heat if self.with_heatmap else None)
        t2 = time.perf_counter()
        timings.update(refinement=t2 - t1, total=t2 - t0)
        try:
            mask = binarise(prob, self.options.threshold)
        except ValueError as exc:  # NaN probabilities
            raise ExportError(f"{(self.refiner or self.patch).source}: {exc}") from None
        fraction = None
        if heatmap is not None and heatmap.tissue is not None:
            fraction = 0.0 if no_tissue else float(heatmap.tissue.fraction)
        return H2GSegmentation(count=heatmap.n_patches if heatmap is not None else 0, timings=timings,
                               no_tissue=no_tissue, tissue=fraction, prob=prob, heatmap=heatmap, image=image,
                               heat=heat, mask=mask, threshold=self.options.threshold)

    # ------------------------------------------------------------------ outputs
    def write(self, seg, slide, out_dir, extra=None):
        import json

        from h2g.core.atomic import save_npy, write_json, write_text
        from h2g.io.geojson import origin_offset, tumour_geojson
        from h2g.io.overlay import write_grey_png, write_square_map_tiff

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        mpp = slide_mpp(slide) or 1.0
        paths = {}
        if seg.heatmap is not None:
            heat = seg.heat[..., 0]
            paths.update(heatmap_grid=out / "heatmap.npy", heatmap_png=out / "heatmap.png",
                         heatmap_tiff=out / "heatmap.tiff")
            save_npy(paths["heatmap_grid"], seg.heatmap.probs)
            write_grey_png(paths["heatmap_png"], heat)
            write_square_map_tiff(paths["heatmap_tiff"], heat, slide.dimensions, mpp)
        paths.update(segmentation_png=out / "segmentation.png", segmentation_tiff=out / "segmentation.tiff",
                     geojson=out / "tumour.geojson", summary=out / "summary.json")
        write_grey_png(paths["segmentation_png"], seg.mask)
        write_square_map_tiff(paths["segmentation_tiff"], seg.mask, slide.dimensions, mpp)
        write_text(paths["geojson"], json.dumps(tumour_geojson(
            seg.mask, slide.dimensions, origin_offset(slide, self.options.geojson_origin))))
        summary = {
            "slide": str(slide.path),
            "dimensions": list(slide.dimensions),
            "system": "h2g",
            "patches": seg.count,
            "grid_shape": list(seg.heatmap.grid_shape) if seg.heatmap is not None else None,
            "step": seg.heatmap.step if seg.heatmap is not None else None,
            "magnification": self.magnification,
            "patch_size": self.patch_size,
            "heatmap_stride": self.heatmap_stride,
            "resolution": list(seg.mask.shape),
            "threshold": seg.threshold,
            "tumour_fraction": float(seg.mask.mean()),
            "no_tissue": seg.no_tissue,
            "tissue": seg.tissue,
            "timings": seg.timings,
            "backends": self.info(),
            **(extra or {}),
            "files": {k: str(v) for k, v in paths.items()},
        }
        write_json(paths["summary"], summary)
        return paths

    def tumour_mm2(self, seg, slide):
        mpp = slide_mpp(slide)
        return mask_area_mm2(seg.mask, slide.dimensions, mpp) if mpp else None

    def describe(self, seg):
        return (f"{seg.count} patches, tumour {100 * seg.mask.mean():.1f} % of the {self.size}x{self.size} view, "
                f"{seg.timings.get('total', 0.0):.2f} s ({self.engine_line()})")

    def settings(self):
        return {**super().settings(), "magnification": self.magnification, "patch_size": self.patch_size,
                "heatmap_stride": self.heatmap_stride, "size": self.size}

    # ------------------------------------------------------------------ benchmark hooks
    def patch_corners(self, slide, tissue) -> np.ndarray:
        """The level-0 corners of the patches the heatmap of ``slide`` reads."""
        from h2g.inference.heatmap import heatmap_grid

        _, corners = heatmap_grid(slide, tissue, magnification=self.magnification, patch_size=self.patch_size,
                                  stride=self.heatmap_stride, tissue_threshold=self.options.tissue_threshold)
        return corners

    def work_alone(self, slide, seg):
        from h2g.data.readers import read_patch
        from h2g.inference.heatmap import PatchReader

        if seg.heatmap is None:
            return None
        corners = self.patch_corners(slide, seg.heatmap.tissue)
        kw = dict(magnification=self.magnification, patch_size=self.patch_size)
        with Timed() as read_only, PatchReader(slide, corners, batch_size=self.batch_size,
                                               readers=self.options.readers, **kw) as reader:
            for _ in reader:
                pass
        inference_only = Timed()
        if len(corners):
            batch = np.stack([read_patch(slide, int(x), int(y), **kw) for x, y in corners[:self.batch_size]])
            inference_only = inference_only_seconds(self.patch, batch.astype(np.float32) / 255.0, len(corners),
                                                    self.batch_size)
        return read_only, inference_only

    def derived_timings(self, timings):
        if "patch_pipeline" not in timings:
            return {"patch_wise": 0.0}
        return {"patch_wise": timings["tissue"] + timings["patch_pipeline"] + timings["stitching"]}

    def setup(self, seg):
        return {"grid_shape": list(seg.heatmap.grid_shape) if seg.heatmap is not None else None,
                "magnification": self.magnification, "patch_size": self.patch_size,
                "heatmap_stride": self.heatmap_stride or self.patch_size, "refinement_size": self.size}

    # ------------------------------------------------------------------ int8 guard hooks
    def guard_outputs(self, seg):
        out = {"pixel": seg.prob}
        if seg.heatmap is not None:
            out["patch"] = seg.heatmap.probs
        return out

    @classmethod
    def calibration_feeds(cls, role, metadata, inputs, records, n, seed, *, models=None):
        if role == "patch_classifier":
            return _patch_feeds(metadata, records, n, seed)
        if role == "refinement":
            return _refinement_feeds(inputs, records, models or {})
        return super().calibration_feeds(role, metadata, inputs, records, n, seed, models=models)


def _patch_feeds(metadata, records, n: int, seed: int) -> tuple[list[dict], str]:
    """Tissue patches of the patch classifier's view from every training slide."""
    from h2g.io.slide import open_slide
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import detect_tissue

    if not metadata.views:
        raise ExportError(f"{metadata.system} {metadata.role}: no views in the metadata, so the calibration "
                          "inputs are unknown")
    view = metadata.views[0]
    candidates = []
    for k, record in enumerate(records):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            grid = build_patch_grid(slide, tissue=detect_tissue(slide), magnification=view.magnification,
                                    patch_size=view.size)
            candidates += [(k, tuple(int(v) for v in c)) for c in grid.coords]
    feeds = read_picks(records, pick(candidates, n, seed), lambda slide, coord: {
        "image": slide.read_region(coord, (view.size, view.size), view.magnification)[None]})
    return feeds, (f"{len(feeds)} tissue patches {view.size}px at {view.magnification:g}x of "
                   f"{len(records)} training slides, seed {seed}")


def _refinement_feeds(inputs: dict, records, models: dict) -> tuple[list[dict], str]:
    """The training slides' low-resolution images (and the f32 patch classifier's heatmaps
    for a network with a heatmap input), with their mirrors."""
    from h2g.inference.lowres import refinement_inputs
    from h2g.inference.segmenter import EngineOptions
    from h2g.io.slide import open_slide

    with_heatmap = "heatmap" in inputs
    size = inputs["image"][1] if isinstance(inputs["image"][1], int) else DEFAULT_SIZE
    segmenter = None
    if with_heatmap:
        if "patch_classifier" not in models:
            raise ExportError("a refinement network needs its patch classifier in the same folder to calibrate on "
                              "real heatmaps")
        patch = EngineOptions(precision="f32").backend(models["patch_classifier"], main=True)
        segmenter = H2GSegmenter({"patch_classifier": patch}, H2GOptions(size=size))
    feeds = []
    for record in records:
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            heatmap = segmenter.heatmap(slide) if segmenter is not None else None
            image, heat = refinement_inputs(slide, heatmap, size=size)
        for flip in (False, True):
            im, ht = (image[:, ::-1], heat[:, ::-1]) if flip else (image, heat)
            feed = {"image": np.ascontiguousarray(im[None], np.float32)}
            if with_heatmap:
                feed["heatmap"] = np.ascontiguousarray(ht[None], np.float32)
            feeds.append(feed)
    return feeds, (f"low-resolution images {size} px of {len(records)} training slides"
                   + (" + the f32 patch classifier's heatmaps" if with_heatmap else "") + ", and their mirrors")
