"""Deployment without TensorFlow: segment a slide with exported models, write its outputs,
benchmark the pipeline (the paper's Table 3), and describe it as a FAST text pipeline.

Everything here runs in a venv with only ONNX Runtime or OpenVINO (``pip install
'h2g[deploy]'``); the models run through :mod:`h2g.inference`'s backends, the same core
that makes the training-time heatmaps.

Outputs of :func:`write_outputs` (``S`` = the refinement size, 1024 by default):

- ``heatmap.npy``: the patch-grid heatmap (rows, cols), one cell per patch;
- ``heatmap.png`` / ``segmentation.png``: the heatmap on the slide's extent and the refined
  segmentation at S x S (grey levels = probability x 255; 255 = tumour);
- ``heatmap.tiff`` / ``segmentation.tiff``: the same maps resized to the slide's aspect
  ratio (long side S), as pyramidal TIFFs whose resolution makes them overlay the slide;
- ``tumour.geojson``: the tumour outline as a FeatureCollection of one "Tumor" annotation
  (Polygon or MultiPolygon, holes kept) in level-0 pixel coordinates, which QuPath imports;
- ``summary.json``: timings, backends, patch count, tumour fraction.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from h2g.inference.backends import Backend
from h2g.inference.heatmap import Heatmap, slide_heatmap
from h2g.inference.lowres import refine, refinement_inputs
from h2g.io.pyramid import write_pyramid
from h2g.io.geojson import tumour_geojson


# --------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """A slide's heatmap and refined segmentation at the refinement resolution."""

    heatmap: Heatmap  # patch-grid heatmap
    image: np.ndarray  # (S, S, 3) low-resolution image in [0, 1]
    heat: np.ndarray  # (S, S, 1) heatmap on the slide's extent
    prob: np.ndarray  # (S, S) refined tumour probability
    mask: np.ndarray  # (S, S) bool, prob >= threshold
    timings: dict = field(default_factory=dict)


def add_pipeline_arguments(parser) -> None:
    """The command-line options that export/segment_slide.py and export/benchmark.py
    share: the two models, the engine and how the slide is cut into patches."""
    from h2g.inference.backends import DEVICES, HINTS, PRECISIONS

    parser.add_argument("--patch-model", type=Path, required=True, help="patch classifier (.onnx or .xml)")
    parser.add_argument("--refine-model", type=Path, required=True, help="refinement network (.onnx or .xml)")
    parser.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    parser.add_argument("--device", choices=DEVICES, default="CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="OpenVINO inference precision (default: the engine's choice, bf16 on CPUs "
                             "that have it; always recorded)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--patch-hint", choices=HINTS, default="throughput",
                        help="performance hint of the patch classifier (default throughput: sub-batches "
                             "on concurrent streams, which lose less to the patch readers sharing the "
                             "cores); the refinement network always runs latency")
    parser.add_argument("--mpp", type=float, default=None, help="microns per pixel, for slides without it")
    parser.add_argument("--magnification", type=float, default=10.0, help="patch magnification (default 10x)")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=None,
                        help="refinement resolution (default: the refinement model's input size, else 1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--readers", type=int, default=2, help="patch reader threads")


def pipeline_backends(args) -> tuple[Backend, Backend]:
    """The patch and refinement backends that :func:`add_pipeline_arguments`' options name
    (fills in ``args.size`` from the refinement model when not given)."""
    from h2g.inference.backends import make_backend

    backends = tuple(make_backend(path, engine=args.engine, device=args.device, precision=args.precision,
                                  threads=args.threads, hint=hint)
                     for path, hint in ((args.patch_model, args.patch_hint), (args.refine_model, "latency")))
    if args.size is None:  # the resolution the refinement model was trained at
        args.size = backends[1].image_size or 1024
    return backends


def segment(slide, patch_backend: Backend, refine_backend: Backend, *, size: int = 1024,
            magnification: float = 10, patch_size: int = 256, batch_size: int = 32,
            readers: int = 2, threshold: float = 0.5, tissue=None, progress: bool = True) -> Segmentation:
    """The H2G-Net pipeline on ``slide``: heatmap (:func:`h2g.inference.slide_heatmap`),
    refinement inputs, refinement, threshold.  ``timings`` holds seconds per stage:
    tissue, reading, inference, waiting, patch_pipeline, stitching, refinement, total."""
    timings: dict = {}
    t0 = time.perf_counter()
    heatmap = slide_heatmap(slide, patch_backend, tissue=tissue, magnification=magnification,
                            patch_size=patch_size, batch_size=batch_size, readers=readers,
                            progress=progress, timings=timings)
    t1 = time.perf_counter()
    image, heat = refinement_inputs(slide, heatmap, size=size)
    prob = refine(refine_backend, image, heat)
    t2 = time.perf_counter()
    timings.update(refinement=t2 - t1, total=t2 - t0)
    return Segmentation(heatmap, image, heat, prob, prob >= threshold, timings)


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------
def to_uint8(values: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] or a boolean mask as uint8 grey levels (x 255)."""
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    return np.clip(np.rint(np.asarray(values, np.float32) * 255.0), 0, 255).astype(np.uint8)


def overlay_tiff(path, values: np.ndarray, dimensions: tuple[int, int], mpp: float) -> Path:
    """Write an S x S map of a slide of level-0 ``dimensions`` = (w, h) as a lossless
    pyramidal TIFF with the slide's aspect ratio (long side S) and the resolution that
    makes it overlay the slide (``mpp`` microns per level-0 pixel)."""
    width, height = dimensions
    side = values.shape[0]
    downsample = max(width, height) / side
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    resample = Image.NEAREST if values.dtype == bool else Image.BILINEAR
    plane = np.asarray(Image.fromarray(to_uint8(values)).resize(size, resample))
    return write_pyramid(path, plane, mpp=mpp * downsample, compression="zlib")


def write_outputs(seg: Segmentation, slide, out_dir, extra: dict | None = None) -> dict[str, Path]:
    """Write the segmentation's files (see the module doc) into ``out_dir``; ``extra`` is
    merged into ``summary.json``.  Returns ``{name: path}``."""
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
    np.save(paths["heatmap_grid"], seg.heatmap.probs)
    Image.fromarray(to_uint8(heat)).save(paths["heatmap_png"])
    Image.fromarray(to_uint8(seg.mask)).save(paths["segmentation_png"])
    overlay_tiff(paths["heatmap_tiff"], heat, slide.dimensions, slide.mpp)
    overlay_tiff(paths["segmentation_tiff"], seg.mask, slide.dimensions, slide.mpp)
    paths["geojson"].write_text(json.dumps(tumour_geojson(seg.mask, slide.dimensions)))
    summary = {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        "patches": seg.heatmap.n_patches,
        "grid_shape": list(seg.heatmap.grid_shape),
        "step": seg.heatmap.step,
        "resolution": list(seg.mask.shape),
        "tumour_fraction": float(seg.mask.mean()),
        "timings": seg.timings,
        **(extra or {}),
        "files": {k: str(v) for k, v in paths.items()},
    }
    paths["summary"].write_text(json.dumps(summary, indent=2))
    return paths


# --------------------------------------------------------------------------------------
# Benchmark (Table 3)
# --------------------------------------------------------------------------------------
#: Stages reported by :func:`benchmark`: ``reading`` and ``inference`` are busy seconds
#: inside the overlapped ``patch_pipeline`` (wall); ``patch_wise`` = tissue +
#: patch_pipeline + stitching, the paper's "Patch-wise" column.
