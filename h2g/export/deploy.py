"""Deployment without TensorFlow: segment a slide with exported models, write its outputs,
benchmark the pipeline (the paper's Table 3), and describe it as a FAST text pipeline.

Everything here runs in a venv with only ONNX Runtime or OpenVINO (the base install,
``pip install h2g``, has no TensorFlow); the models run through :mod:`h2g.inference.backends`'s backends, the same core
that makes the training-time heatmaps.

Outputs of :func:`write_outputs` (``S`` = the refinement size, 1024 by default):

- ``heatmap.npy``: the patch-grid heatmap (rows, cols), one cell per patch;
- ``heatmap.png`` / ``segmentation.png``: the heatmap on the slide's extent and the refined
  segmentation at S x S (grey levels = probability x 255; 255 = tumour);
- ``heatmap.tiff`` / ``segmentation.tiff``: the same maps resized to the slide's aspect
  ratio (long side S), as pyramidal TIFFs whose resolution makes them overlay the slide;
- ``tumour.geojson``: the tumour outline as a FeatureCollection of one "Tumor" annotation
  (Polygon or MultiPolygon, holes kept) in level-0 pixel coordinates, which QuPath imports;
- ``summary.json``: timings, backends, patch count, tumour fraction, ``no_tissue``.

A slide without tissue (no patch over tissue) is reported with a warning naming it; its
outputs say so (``"no_tissue": true``, an empty mask) and the refinement network is not
run on an all-zero heatmap.  The mask is ``prob > threshold``, the rule of evaluation
(:func:`h2g.evaluation.metrics.binarise`).

Multi-class systems whose exported model carries views in its metadata (DMMN, ...) are
segmented by sliding window (:func:`segment_windows`, :mod:`h2g.inference.sliding`);
:func:`write_raster_outputs` writes their files (see its docstring).
:func:`deployment_plan` chooses between the two from the models' metadata.

Every output is written atomically (:func:`h2g.core.atomic.replace_atomically`).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2g.core.atomic import save_npy, write_json, write_text
from h2g.core.errors import ConfigError, ExportError
from h2g.data.views import View
from h2g.evaluation.metrics import binarise
from h2g.export.metadata import ModelMetadata
from h2g.inference.backends import Backend
from h2g.inference.heatmap import Heatmap, slide_heatmap
from h2g.inference.lowres import refine, refinement_inputs
from h2g.inference.raster import Raster
from h2g.io.geojson import class_geojson, tumour_geojson
from h2g.io.overlay import to_uint8  # noqa: F401  (re-exported)
from h2g.io.overlay import write_grey_png, write_label_overlay, write_map_tiff, write_png, write_square_map_tiff

log = logging.getLogger(__name__)
DEFAULT_MAGNIFICATION, DEFAULT_PATCH_SIZE = 10.0, 256


# --------------------------------------------------------------------------------------
# Segmentation (H2G-Net)
# --------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """A slide's heatmap and refined segmentation at the refinement resolution."""

    heatmap: Heatmap  # patch-grid heatmap
    image: np.ndarray  # (S, S, 3) low-resolution image in [0, 1]
    heat: np.ndarray  # (S, S, 1) heatmap on the slide's extent
    prob: np.ndarray  # (S, S) refined tumour probability
    mask: np.ndarray  # (S, S) bool, prob > threshold (evaluation's rule)
    timings: dict = field(default_factory=dict)
    no_tissue: bool = False  # no patch over tissue: nothing was refined
    threshold: float = 0.5


def add_window_arguments(parser) -> None:
    """``--stride``, ``--keep`` and ``--blend``: the sliding-window options shared by the
    deployment CLIs (segment_slide, segment_cohort, benchmark)."""
    from h2g.inference.sliding import BLENDS

    parser.add_argument("--stride", type=int, default=None,
                        help="sliding window: stride in target-view pixels (default: the view's size)")
    parser.add_argument("--keep", type=int, default=None,
                        help="sliding window, blend centre: central pixels kept per window (default: the stride)")
    parser.add_argument("--blend", choices=BLENDS, default="centre",
                        help="sliding window: how overlapping predictions combine (default centre)")


def add_pipeline_arguments(parser, models_required: bool = True) -> None:
    """The command-line options that export/segment_slide.py and export/benchmark.py
    share: the two models, the engine and how the slide is cut into patches.
    ``--magnification`` and ``--patch-size`` default to the patch model's metadata."""
    from h2g.inference.backends import DEVICES, HINTS, PRECISIONS, PROVIDERS

    parser.add_argument("--patch-model", type=Path, required=models_required, help="patch classifier (.onnx or .xml)")
    parser.add_argument("--refine-model", type=Path, required=models_required,
                        help="refinement network (.onnx or .xml)")
    parser.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    parser.add_argument("--device", choices=DEVICES, default="CPU")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="ONNX Runtime on --device GPU: tensorrt (with CUDA for what TensorRT does not take), "
                             "cuda, or auto (TensorRT where installed, else CUDA)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="OpenVINO inference precision (default: the engine's choice, bf16 on CPUs "
                             "that have it; always recorded)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--patch-hint", choices=HINTS, default="throughput",
                        help="performance hint of the patch classifier (default throughput: sub-batches "
                             "on concurrent streams, which lose less to the patch readers sharing the "
                             "cores); the refinement network always runs latency")
    parser.add_argument("--mpp", type=float, default=None, help="microns per pixel, for slides without it")
    parser.add_argument("--magnification", type=float, default=None,
                        help="patch magnification (default: the model's metadata, else 10x)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch size (default: the model's metadata, else 256)")
    parser.add_argument("--heatmap-stride", type=int, default=None,
                        help="H2G-Net: px between patch centres (default: the refinement model's metadata, "
                             "else the patch size: non-overlapping patches)")
    parser.add_argument("--size", type=int, default=None,
                        help="refinement resolution (default: the refinement model's input size, else 1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--readers", type=int, default=2, help="patch reader threads")
    parser.add_argument("--reader", choices=("tiles", "reduced", "openslide"), default="tiles",
                        help="how patches are read: tiles (default) cuts them from decoded TIFF / SVS tiles on a "
                             "level's pixel grid (OpenSlide's pixels, faster), else OpenSlide; reduced also decodes "
                             "JPEG tiles at 1/2-1/8 scale for a magnification without its own level (pixels "
                             "differ slightly from training's OpenSlide + area resize); openslide: OpenSlide only")


def _setting(given, from_model, default, what: str, source: str):
    """An argument that overrides the model's metadata (with a warning when they differ)."""
    if given is None:
        return from_model if from_model is not None else default
    if from_model is not None and float(given) != float(from_model):
        log.warning("%s: %s %g overrides the model's %g from its metadata", source, what, given, from_model)
    return given


def pipeline_backends(args) -> tuple[Backend, Backend]:
    """The patch and refinement backends that :func:`add_pipeline_arguments`' options name.
    Fills in ``args.size`` from the refinement model and ``args.magnification`` /
    ``args.patch_size`` from the patch model's metadata when not given."""
    from h2g.inference.backends import make_backend

    backends = tuple(make_backend(path, engine=args.engine, device=args.device, precision=args.precision,
                                  threads=args.threads, hint=hint,
                                  provider=getattr(args, "provider", None))
                     for path, hint in ((args.patch_model, args.patch_hint), (args.refine_model, "latency")))
    meta = backends[0].metadata
    view = meta.views[0] if meta is not None and meta.views else None
    args.magnification = _setting(args.magnification, view.magnification if view else None,
                                  DEFAULT_MAGNIFICATION, "--magnification", backends[0].source)
    args.patch_size = int(_setting(args.patch_size, view.size if view else None, DEFAULT_PATCH_SIZE,
                                   "--patch-size", backends[0].source))
    if args.size is None:  # the resolution the refinement model was trained at
        args.size = backends[1].image_size or 1024
    # the stride the refinement net was trained on (else the one its classifier's heatmaps used)
    trained = next((m.extras["heatmap_stride"] for m in (backends[1].metadata, meta)
                    if m is not None and m.extras.get("heatmap_stride") is not None), None)
    args.heatmap_stride = _setting(getattr(args, "heatmap_stride", None), trained, None, "--heatmap-stride",
                                   backends[1].source)
    if args.heatmap_stride is not None:
        args.heatmap_stride = int(args.heatmap_stride)
    return backends


def _binarise(prob: np.ndarray, threshold: float, source: str) -> np.ndarray:
    try:
        return binarise(prob, threshold)
    except ValueError as exc:  # NaN probabilities
        raise ExportError(f"{source}: {exc}") from None


def segment(slide, patch_backend: Backend, refine_backend: Backend, *, size: int = 1024,
            magnification: float = 10, patch_size: int = 256, heatmap_stride: int | None = None,
            batch_size: int = 32, readers: int = 2, threshold: float = 0.5, tissue=None,
            progress: bool = True) -> Segmentation:
    """The H2G-Net pipeline on ``slide``: heatmap (:func:`h2g.inference.heatmap.slide_heatmap`,
    patches ``heatmap_stride`` px apart: None for the paper's non-overlapping grid),
    refinement inputs, refinement, ``prob > threshold``.  ``timings`` holds seconds per
    stage: tissue, reading, inference, waiting, patch_pipeline, stitching, refinement,
    total.  A slide with no patch over tissue is not refined: a warning, an all-zero
    probability and ``no_tissue``."""
    timings: dict = {}
    t0 = time.perf_counter()
    heatmap = slide_heatmap(slide, patch_backend, tissue=tissue, magnification=magnification,
                            patch_size=patch_size, stride=heatmap_stride, batch_size=batch_size,
                            readers=readers, progress=progress, timings=timings)
    t1 = time.perf_counter()
    image, heat = refinement_inputs(slide, heatmap, size=size)
    no_tissue = heatmap.n_patches == 0
    if no_tissue:
        log.warning("%s: no tissue found (no %d px patch at %gx over tissue); writing empty outputs, "
                    "refinement not run", slide.path, patch_size, magnification)
        prob = np.zeros((size, size), np.float32)
    else:
        prob = refine(refine_backend, image, heat)
    t2 = time.perf_counter()
    timings.update(refinement=t2 - t1, total=t2 - t0)
    return Segmentation(heatmap, image, heat, prob, _binarise(prob, threshold, refine_backend.source), timings,
                        no_tissue=no_tissue, threshold=threshold)


# --------------------------------------------------------------------------------------
# Outputs (H2G-Net)
# --------------------------------------------------------------------------------------
def write_outputs(seg: Segmentation, slide, out_dir, extra: dict | None = None) -> dict[str, Path]:
    """Write the segmentation's files (see the module doc) into ``out_dir``, each one
    atomically; ``extra`` is merged into ``summary.json``.  Returns ``{name: path}``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heat = seg.heat[..., 0]
    paths = {
        "heatmap_grid": out / "heatmap.npy",
        "heatmap_png": out / "heatmap.png",
        "segmentation_png": out / "segmentation.png",
        "heatmap_tiff": out / "heatmap.tiff",
        "segmentation_tiff": out / "segmentation.tiff",
        "geojson": out / "tumour.geojson",
        "summary": out / "summary.json",
    }
    save_npy(paths["heatmap_grid"], seg.heatmap.probs)
    write_grey_png(paths["heatmap_png"], heat)
    write_grey_png(paths["segmentation_png"], seg.mask)
    write_square_map_tiff(paths["heatmap_tiff"], heat, slide.dimensions, slide.mpp)
    write_square_map_tiff(paths["segmentation_tiff"], seg.mask, slide.dimensions, slide.mpp)
    write_text(paths["geojson"], json.dumps(tumour_geojson(seg.mask, slide.dimensions)))
    tissue = seg.heatmap.tissue
    summary = {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        "patches": seg.heatmap.n_patches,
        "grid_shape": list(seg.heatmap.grid_shape),
        "step": seg.heatmap.step,
        "resolution": list(seg.mask.shape),
        "threshold": seg.threshold,
        "tumour_fraction": float(seg.mask.mean()),
        "no_tissue": seg.no_tissue,
        "tissue": 0.0 if seg.no_tissue else (tissue.fraction if tissue is not None else None),
        "timings": seg.timings,
        **(extra or {}),
        "files": {k: str(v) for k, v in paths.items()},
    }
    write_json(paths["summary"], summary)
    return paths


# --------------------------------------------------------------------------------------
# Sliding-window segmentation (systems whose model carries its views)
# --------------------------------------------------------------------------------------
PALETTE = ((200, 0, 0), (0, 150, 0), (0, 0, 200), (200, 200, 0), (150, 0, 150), (0, 150, 150), (120, 120, 120))


@dataclass
class WindowSegmentation:
    """A slide's sliding-window segmentation and what produced it."""

    raster: Raster
    metadata: ModelMetadata  # as run (views after any override)
    timings: dict = field(default_factory=dict)
    no_tissue: bool = False
    tissue: float = 0.0  # fraction of the slide's tissue mask


def _classes(metadata: ModelMetadata, n: int) -> list[dict]:
    """The metadata's classes, or ``class<i>`` names in a default palette; :class:`ExportError`
    when their number is not the model's output channels."""
    if metadata.classes:
        if len(metadata.classes) != n:
            raise ExportError(f"the model outputs {n} classes but its metadata names "
                              f"{len(metadata.classes)}: {metadata.class_names}")
        return [dict(c) for c in metadata.classes]
    return [{"name": f"class{i}", "colour": list(PALETTE[i % len(PALETTE)])} for i in range(n)]


def override_views(metadata: ModelMetadata, magnification: float | None, patch_size: int | None,
                   source: str) -> ModelMetadata:
    """The metadata with its target view's magnification / size replaced by the
    arguments (a warning when they disagree); the other views keep their ratios to it."""
    target = metadata.view()
    mag = _setting(magnification, target.magnification, None, "--magnification", source)
    size = int(_setting(patch_size, target.size, None, "--patch-size", source))
    if mag == target.magnification and size == target.size:
        return metadata
    zoom, grow = mag / target.magnification, size / target.size
    views = tuple(View(v.name, v.magnification * zoom, max(1, round(v.size * grow)), v.padding)
                  for v in metadata.views)
    return metadata.replace(views=views)


def segment_windows(slide, backend: Backend, metadata: ModelMetadata | None = None, *,
                    stride: int | None = None, keep: int | None = None, blend: str = "centre",
                    magnification: float | None = None, patch_size: int | None = None,
                    batch_size: int = 8, readers: int = 2, tissue=None, progress: bool = True) -> WindowSegmentation:
    """Sliding-window segmentation of ``slide`` by a model whose metadata (default: the
    backend's) names its views (:func:`h2g.inference.sliding.sliding_segmentation`).
    A slide without tissue gives a warning and an empty raster (no window is run)."""
    from h2g.inference.sliding import sliding_segmentation
    from h2g.tiling.tissue import detect_tissue

    metadata = metadata or backend.metadata
    if metadata is None or not metadata.views:
        raise ExportError(f"{backend.source}: no views in the model's metadata, so the windows to read are "
                          "unknown (export it with export/convert.py and a <model>.meta.json sidecar)")
    metadata = override_views(metadata, magnification, patch_size, backend.source)
    timings: dict = {}
    t0 = time.perf_counter()
    if tissue is None:
        tissue = detect_tissue(slide)
    detection = time.perf_counter() - t0
    raster = sliding_segmentation(slide, backend, metadata.views, target=metadata.view().name, stride=stride,
                                  keep=keep, blend=blend, tissue=tissue, batch_size=batch_size, readers=readers,
                                  progress=progress, timings=timings)
    timings["tissue"] += detection
    timings["total"] = time.perf_counter() - t0
    no_tissue = timings["windows"] == 0
    if no_tissue:
        log.warning("%s: no tissue found (no window over tissue); writing empty outputs", slide.path)
    return WindowSegmentation(raster, metadata, timings, no_tissue, 0.0 if no_tissue else tissue.fraction)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def write_raster_outputs(seg: WindowSegmentation, slide, out_dir, extra: dict | None = None) -> dict[str, Path]:
    """Write a sliding-window segmentation into ``out_dir`` (each file atomically):

    - ``probabilities.npy``: the raster ``(H, W, C)`` float32;
    - ``labels.tiff`` / ``labels.png``: the label image, uint8, 0 = not segmented (no
      tissue), ``i + 1`` = class ``i`` (the mapping is in ``summary.json``); the TIFF is
      pyramidal at the raster's resolution, so it overlays the slide;
    - ``probability_<class>.tiff``: each class's probability (grey level x 255), likewise;
    - ``overlay.png``: the label map in the classes' colours over the slide's thumbnail;
    - ``classes.geojson``: one QuPath annotation per class present (level-0 pixels);
    - ``summary.json``: raster geometry, classes, class fractions, windows, timings."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raster = seg.raster
    classes = _classes(seg.metadata, raster.classes)
    labels = raster.label_map(fill=-1)
    image = (labels + 1).astype(np.uint8)
    mpp = slide.mpp
    paths = {"probabilities": out / "probabilities.npy", "labels_tiff": out / "labels.tiff",
             "labels_png": out / "labels.png", "overlay_png": out / "overlay.png",
             "geojson": out / "classes.geojson", "summary": out / "summary.json"}
    save_npy(paths["probabilities"], raster.probs)
    write_map_tiff(paths["labels_tiff"], image, mpp, raster.downsample)
    write_png(paths["labels_png"], image)
    for i, cls in enumerate(classes):
        paths[f"probability_{_slug(cls['name'])}"] = write_map_tiff(
            out / f"probability_{_slug(cls['name'])}.tiff", raster.probs[..., i], mpp, raster.downsample)
    write_label_overlay(paths["overlay_png"], slide, labels, [c["colour"] for c in classes])
    write_text(paths["geojson"], json.dumps(class_geojson(labels, raster.covered_extent, classes)))
    covered = int(raster.covered.sum())
    summary = {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        "system": seg.metadata.system,
        "design": seg.metadata.design,
        "raster": {"shape": list(raster.shape), "downsample": raster.downsample, "extent": list(raster.extent),
                   "mpp": mpp * raster.downsample},
        "views": [v.to_dict() for v in seg.metadata.views],
        "classes": [{**c, "label": i + 1} for i, c in enumerate(classes)],
        "label_values": {"0": "not segmented", **{str(i + 1): c["name"] for i, c in enumerate(classes)}},
        "class_fractions": {c["name"]: (float((labels == i).sum()) / covered if covered else 0.0)
                            for i, c in enumerate(classes)},
        "windows": seg.timings.get("windows", 0),
        "no_tissue": seg.no_tissue,
        "tissue": seg.tissue,
        "timings": seg.timings,
        **(extra or {}),
        "files": {k: str(v) for k, v in paths.items()},
    }
    write_json(paths["summary"], summary)
    return paths


# --------------------------------------------------------------------------------------
# What to run, from the models' metadata
# --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What :func:`deployment_plan` chose: ``kind`` "h2g" (``backends`` patch, refine),
    "sliding" (``backends`` one segmentation model) or "razn" (``backends`` policy,
    coarse, fine: :mod:`h2g.export.zoom`)."""

    kind: str
    backends: tuple
    metadata: ModelMetadata | None = None


def _h2g_plan(args) -> Plan:
    """H2G-Net's plan; the sliding-window options (when ``args`` has them) must be unset."""
    if getattr(args, "stride", None) or getattr(args, "keep", None):
        raise ConfigError("--stride and --keep apply to sliding-window models, not H2G-Net")
    return Plan("h2g", pipeline_backends(args))


def deployment_plan(args, models=()) -> Plan:
    """Choose the pipeline from ``models`` (exported files) and the options of
    :func:`add_pipeline_arguments`: ``--patch-model`` + ``--refine-model``, or a patch
    classifier and a refinement network by their metadata roles -> H2G-Net; one model whose
    metadata has views (role ``segmentation``) -> sliding window."""
    from h2g.export.metadata import model_metadata
    from h2g.inference.backends import make_backend

    models = [Path(m) for m in models]
    if args.patch_model or args.refine_model:
        if models:
            raise ConfigError("give the models either as arguments or with --patch-model / --refine-model")
        if not (args.patch_model and args.refine_model):
            raise ConfigError("H2G-Net needs both --patch-model and --refine-model")
        return _h2g_plan(args)
    if not models:
        raise ConfigError("no model given (MODEL... or --patch-model / --refine-model)")
    metas = {m: model_metadata(m) for m in models}
    missing = [str(m) for m, meta in metas.items() if meta is None]
    if missing:
        raise ExportError(f"{', '.join(missing)}: no h2g metadata in the model file (exported by an older "
                          "version?); give H2G-Net's models with --patch-model and --refine-model")
    from h2g.export.zoom import by_role, is_razn

    if is_razn(metas):  # RAZN: policy + coarse + fine, the conditional zoom (h2g.export.zoom)
        if getattr(args, "stride", None) or getattr(args, "keep", None):
            raise ConfigError("--stride and --keep apply to sliding-window models, not RAZN (its regions tile "
                              "the tissue)")
        paths = by_role(metas)
        backends = tuple(make_backend(paths[r], engine=args.engine, device=args.device, precision=args.precision,
                                      threads=args.threads, hint="latency", provider=getattr(args, "provider", None))
                         for r in ("policy", "coarse", "fine"))
        return Plan("razn", backends, metas[paths["coarse"]])
    roles = {meta.role: m for m, meta in metas.items()}
    if len(models) == 2 and set(roles) == {"patch_classifier", "refinement"}:
        args.patch_model, args.refine_model = roles["patch_classifier"], roles["refinement"]
        return _h2g_plan(args)
    if len(models) == 1 and metas[models[0]].views and metas[models[0]].output == "pixel_probs":
        backend = make_backend(models[0], engine=args.engine, device=args.device, precision=args.precision,
                               threads=args.threads, hint=args.patch_hint,
                               provider=getattr(args, "provider", None))
        return Plan("sliding", (backend,), backend.metadata or metas[models[0]])
    described = ", ".join(f"{m.name} ({metas[m].system} {metas[m].role or '?'})" for m in models)
    raise ExportError(f"cannot tell what to run from the models {described}: expected an H2G-Net patch "
                      "classifier + refinement network, or one segmentation model with views")
