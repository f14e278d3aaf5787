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
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from h2g.errors import ExportError
from h2g.inference import (Backend, Heatmap, PatchReader, available_cpus, refine, refinement_inputs,
                           slide_heatmap)
from h2g.pyramid import write_pyramid

TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}


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
    from h2g.inference import DEVICES, HINTS, PRECISIONS

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
    from h2g.inference import make_backend

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


def _ring(points: np.ndarray, sx: float, sy: float) -> list[list[float]]:
    """A closed ring in level-0 coordinates from mask-pixel (col, row) points."""
    ring = [[round((x + 0.5) * sx, 2), round((y + 0.5) * sy, 2)] for x, y in points]
    return ring + [ring[0]]


def _box_ring(points: np.ndarray, sx: float, sy: float) -> list[list[float]]:
    """The outline of the pixels spanned by ``points`` (for blobs too thin to have an
    area through pixel centres: single pixels, one-pixel lines)."""
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0) + 1
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return [[round(x * sx, 2), round(y * sy, 2)] for x, y in corners]


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def mask_polygons(mask: np.ndarray, dimensions: tuple[int, int]) -> list[list[list[list[float]]]]:
    """Polygons (exterior ring, then hole rings) of the connected regions of ``mask``
    (S_h x S_w over the slide's level-0 extent ``dimensions``), in level-0 pixels.
    Contours come from ``cv2.findContours`` through pixel centres; rings are closed and
    have at least 4 points; holes without area are dropped."""
    import cv2

    height_px, width_px = mask.shape
    sx, sy = dimensions[0] / width_px, dimensions[1] / height_px
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:  # a hole: added with its parent
            continue
        points = contour[:, 0, :]
        rings = [_ring(points, sx, sy) if _area(points) > 0 else _box_ring(points, sx, sy)]
        child = hierarchy[0][i][2]
        while child != -1:
            hole = contours[child][:, 0, :]
            if _area(hole) > 0:
                rings.append(_ring(hole, sx, sy))
            child = hierarchy[0][child][0]
        polygons.append(rings)
    return polygons


def tumour_geojson(mask: np.ndarray, dimensions: tuple[int, int]) -> dict:
    """The tumour outline of ``mask`` as a GeoJSON FeatureCollection that QuPath imports:
    one "Tumor" annotation (Polygon, or MultiPolygon for several regions) in level-0
    pixel coordinates; no features when the mask is empty."""
    polygons = mask_polygons(mask, dimensions)
    if not polygons:
        return {"type": "FeatureCollection", "features": []}
    if len(polygons) == 1:
        geometry = {"type": "Polygon", "coordinates": polygons[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
    feature = {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"objectType": "annotation", "name": "H2G-Net tumour", "classification": TUMOUR_CLASS},
    }
    return {"type": "FeatureCollection", "features": [feature]}


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
STAGES = ("tissue", "reading", "inference", "stitching", "patch_pipeline", "patch_wise", "refinement", "total")
STAGE_LABELS = {
    "tissue": "tissue detection (+ patch grid)",
    "reading": "patch reading (busy s, summed over readers)",
    "inference": "patch inference (busy s)",
    "stitching": "stitching",
    "patch_pipeline": "patch reading + inference (wall, overlapped)",
    "patch_wise": "patch-wise total",
    "refinement": "refinement (inputs + network)",
    "total": "total",
}


def mean_sd(values) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(list(values), np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd}


def peak_memory_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def read_only_seconds(slide, coords: np.ndarray, *, magnification: float, patch_size: int,
                      batch_size: int, readers: int) -> float:
    """Wall seconds to read every patch at ``coords`` with the pipeline's readers, no inference."""
    t0 = time.perf_counter()
    with PatchReader(slide, coords, magnification=magnification, patch_size=patch_size,
                     batch_size=batch_size, readers=readers) as reader:
        for _ in reader:
            pass
    return time.perf_counter() - t0


def inference_only_seconds(backend: Backend, batch: np.ndarray, n_patches: int, batch_size: int) -> float:
    """Wall seconds to predict ``n_patches`` patches in batches of ``batch_size`` from
    memory (``batch`` repeated; the last batch partial as in the pipeline)."""
    full, rest = divmod(n_patches, batch_size)
    t0 = time.perf_counter()
    for _ in range(full):
        backend.predict(batch)
    if rest:
        backend.predict(batch[:rest])
    return time.perf_counter() - t0


def benchmark(slide, patch_backend: Backend, refine_backend: Backend, *, repeats: int = 10,
              size: int = 1024, magnification: float = 10, patch_size: int = 256,
              batch_size: int = 32, readers: int = 2, progress: bool = False) -> dict:
    """Time :func:`segment` on ``slide``: one warm-up, then ``repeats`` runs; then, in the
    same process, the read-only time (all patches read, no inference) and the
    inference-only time (the same number of patches from memory).
    ``pipeline_efficiency`` = (read-only s + inference-only s) / pipeline s, where
    pipeline s is the mean wall time of the overlapped reading + inference (>= 1 when the
    overlap is perfect on cores both stages keep busy)."""
    from h2g.patches import build_patch_grid

    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    kw = dict(size=size, magnification=magnification, patch_size=patch_size,
              batch_size=batch_size, readers=readers, progress=progress)
    warm = segment(slide, patch_backend, refine_backend, **kw)
    runs = []
    for _ in range(repeats):
        timings = segment(slide, patch_backend, refine_backend, **kw).timings
        timings["patch_wise"] = timings["tissue"] + timings["patch_pipeline"] + timings["stitching"]
        runs.append(timings)
    grid = build_patch_grid(slide, tissue=warm.heatmap.tissue, magnification=magnification, patch_size=patch_size)
    n = len(grid.coords)
    read_only = read_only_seconds(slide, grid.coords, magnification=magnification, patch_size=patch_size,
                                  batch_size=batch_size, readers=readers)
    inference_only = 0.0
    if n:
        first = grid.coords[:batch_size]
        batch = np.stack([slide.read_region(tuple(c), (patch_size, patch_size), magnification)
                          for c in first]).astype(np.float32) / 255.0
        inference_only = inference_only_seconds(patch_backend, batch, n, batch_size)
    stages = {s: mean_sd(r[s] for r in runs) for s in STAGES}
    pipeline_s = stages["patch_pipeline"]["mean"]
    info = patch_backend.info()
    return {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        "patches": n,
        "grid_shape": list(grid.grid_shape),
        "magnification": magnification,
        "patch_size": patch_size,
        "batch_size": batch_size,
        "readers": readers,
        "refinement_size": size,
        "warmup": 1,
        "repeats": repeats,
        **{k: info[k] for k in ("engine", "version", "device", "threads", "precision")},
        "patch_backend": info,
        "refine_backend": refine_backend.info(),
        "stages": stages,
        "patches_per_second": mean_sd(n / r["patch_pipeline"] for r in runs),
        "patch_wise_patches_per_second": mean_sd(n / r["patch_wise"] for r in runs),
        "read_only_s": read_only,
        "inference_only_s": inference_only,
        "pipeline_s": pipeline_s,
        "pipeline_efficiency": (read_only + inference_only) / pipeline_s if pipeline_s > 0 else None,
        "refinement_share": stages["refinement"]["mean"] / stages["total"]["mean"],
        "peak_memory_mib": peak_memory_mib(),
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": available_cpus()},
        "runs": runs,
    }


def _engine_setup(info: dict) -> str:
    """``"openvino throughput hint, 2 streams, 2 threads, bf16"`` from a backend's info."""
    parts = [f"{info['engine']} {info['hint']} hint",
             f"{info['streams']} stream{'s' * (info['streams'] != 1)}",
             f"sub-batches of {info['sub_batch']}" if info["sub_batch"] else None,
             f"{info['threads']} threads" if info["threads"] else None,
             info["precision"]]
    return ", ".join(p for p in parts if p)


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['sd']:.2f}"


def benchmark_markdown(result: dict, peer: dict | None = None) -> str:
    """The benchmark in the layout of the paper's Table 3 (Patch-wise, Refinement, Total:
    mean ± sd seconds), followed by the per-stage breakdown and the overlap figures.
    ``peer`` (same keys, e.g. FAST's timings) adds a row."""
    s = result["stages"]
    lines = [
        "# Runtime of the H2G-Net pipeline (layout of the paper's Table 3)",
        "",
        f"Slide `{result['slide']}` ({result['dimensions'][0]} x {result['dimensions'][1]} px, "
        f"{result['patches']} patches of {result['patch_size']} px at {result['magnification']:g}x), "
        f"{result['repeats']} repeats after {result['warmup']} warm-up; mean ± sd in seconds.",
        "",
        "| Engine | Device | Precision | Threads | Patch-wise | Refinement | Total |",
        "|---|---|---|---|---|---|---|",
        f"| {result['engine']} {result['version'].split('-')[0]} | {result['device']} | {result['precision']} | "
        f"{result['threads']} | {_cell(s['patch_wise'])} | {_cell(s['refinement'])} | {_cell(s['total'])} |",
    ]
    if peer is not None:
        ps = peer["stages"]
        cells = [_cell(ps[k]) if k in ps else "not timed" for k in ("patch_wise", "refinement", "total")]
        lines.append(f"| {peer['engine']} ({peer['version']}) | {peer['device']} | {peer['precision']} | "
                     f"{peer.get('threads') or '-'} | {' | '.join(cells)} |")
    lines += ["", "| Stage | Mean (s) | SD (s) |", "|---|---|---|"]
    lines += [f"| {STAGE_LABELS[k]} | {s[k]['mean']:.3f} | {s[k]['sd']:.3f} |" for k in STAGES]
    eff = result["pipeline_efficiency"]
    lines += [
        "",
        f"- patches/s: {_cell(result['patches_per_second'])} over reading + inference; "
        f"{_cell(result['patch_wise_patches_per_second'])} over the whole patch-wise stage "
        "(tissue detection to heatmap)",
    ]
    if peer is not None:
        ours, theirs = result["patch_wise_patches_per_second"]["mean"], peer["patches_per_second"]["mean"]
        lines.append(f"- peer {peer['engine']}: {_cell(peer['patches_per_second'])} patches/s "
                     f"({peer['patches']} patches) over its patch-wise stage (slide import to heatmap): "
                     f"ours is {ours / theirs:.2f}x")
    lines += [
        f"- read-only {result['read_only_s']:.3f} s + inference-only {result['inference_only_s']:.3f} s "
        f"vs pipeline {result['pipeline_s']:.3f} s: pipeline efficiency "
        + (f"{eff:.2f}" if eff is not None else "n/a"),
        f"- refinement share of total: {100 * result['refinement_share']:.2f} %",
        f"- patch classifier: {_engine_setup(result['patch_backend'])}; refinement: "
        f"{_engine_setup(result['refine_backend'])}; batch {result['batch_size']}, "
        f"{result['readers']} reader threads",
        f"- peak resident memory: {result['peak_memory_mib']:.0f} MiB",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# FAST (FastPathology) text pipeline and peer timing
# --------------------------------------------------------------------------------------
FAST_ENGINES = {"openvino": "OpenVINO", "onnxruntime": "ONNXRuntime", "tensorrt": "TensorRT"}
FAST_INSTALL_HINT = ("pip install pyfast (it also needs Debian's libusb-1.0-0 and an OpenCL platform "
                     "such as pocl-opencl-icd)")


def fast_pipeline_text(patch_model, refine_model, *, magnification: float = 10, patch_size: int = 256,
                       tissue_threshold: float = 0.25, engine: str = "openvino") -> str:
    """A FAST / FastPathology text pipeline (.fpl) running H2G-Net with the paper's
    parameters: tissue segmentation (colour thresholding, no model download) ->
    ``patch_size`` patches at ``magnification`` with more than ``tissue_threshold``
    tissue -> patch classifier -> stitched heatmap (tumour channel) -> refinement network
    on the low-resolution image in [0, 1] (input 0, ``image``) and the heatmap (input 1,
    ``heatmap``).  The slide is the pipeline input ``WSI`` (FastPathology provides it; in
    Python: ``fast.Pipeline(path).parse(inputData={"WSI": pyramid})``); its outputs are
    ``heatmap`` and ``segmentation``."""
    if engine not in FAST_ENGINES:
        raise ExportError(f"FAST engine must be one of {', '.join(FAST_ENGINES)}, got {engine!r}")
    fast_engine = FAST_ENGINES[engine]
    patch_model, refine_model = Path(patch_model).resolve(), Path(refine_model).resolve()
    blocks = [
        ['PipelineName "H2G-Net breast tumour segmentation"',
         f'PipelineDescription "Patch-wise tumour heatmap ({patch_size} x {patch_size} patches at '
         f'{magnification:g}x) refined with the low-resolution image (Pedersen et al. 2022)"',
         'PipelineInputData WSI "Whole-slide image"',
         "PipelineOutputData heatmap finish 0",
         "PipelineOutputData segmentation refinement 0",
         'Attribute classes "Background;Tumor"',
         "",
         "### Processing chain"],
        ["# colour thresholding: no model to download, works offline",
         "ProcessObject tissueSeg TissueSegmentation", "Attribute color-thresholding true", "Input 0 WSI"],
        ["ProcessObject patch PatchGenerator",
         f"Attribute patch-size {patch_size} {patch_size}",
         f"Attribute patch-magnification {magnification:g}",
         "Attribute patch-overlap 0.0",
         f"Attribute mask-threshold {tissue_threshold:g}",
         "Input 0 WSI", "Input 1 tissueSeg 0"],
        ["# patches arrive as uint8; the classifier expects [0, 1]",
         "ProcessObject network NeuralNetwork",
         f'Attribute model "{patch_model}"',
         f"Attribute inference-engine {fast_engine}",
         "Attribute scale-factor 0.00392156862745098",
         "Input 0 patch 0"],
        ["ProcessObject stitcher PatchStitcher", "Input 0 network 0"],
        ["ProcessObject finish RunUntilFinished", "Input 0 stitcher 0"],
        ["# channel 1 of the stitched softmax = tumour probability",
         "ProcessObject heatmap TensorToImage", "Attribute channels 1", "Input 0 finish 0"],
        ["# the coarsest pyramid level; the network resizes its inputs to its own size",
         "ProcessObject lowRes ImagePyramidLevelExtractor", "Attribute level -1", "Input 0 WSI"],
        ["ProcessObject scale IntensityNormalization", "Input 0 lowRes 0"],
        ["# input 0 = image, input 1 = heatmap (the ONNX input order)",
         "ProcessObject refinement SegmentationNetwork",
         f'Attribute model "{refine_model}"',
         f"Attribute inference-engine {fast_engine}",
         "Input 0 scale 0", "Input 1 heatmap 0"],
    ]
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def batch_one_copy(model, out_dir) -> Path:
    """An OpenVINO IR copy of ``model`` (.onnx or .xml) with its batch dimension fixed
    to 1, written as ``out_dir/<stem>_batch1.xml/.bin``.  FAST's OpenVINO engine feeds
    one patch at a time and cannot compile our dynamic-batch exports ("Primitive
    descriptor was not found for node .../MatMul")."""
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("FAST's OpenVINO engine needs batch-1 copies of the models, made with "
                          "openvino (pip install openvino)") from None
    model = Path(model)
    try:
        graph = ov.Core().read_model(str(model))
        graph.reshape({i.get_any_name(): [1, *[d.get_length() for d in i.get_partial_shape()[1:]]]
                       for i in graph.inputs})
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses
        raise ExportError(f"{model}: cannot make a batch-1 copy for FAST: {str(exc).splitlines()[0]}") from None
    out = Path(out_dir) / f"{model.stem}_batch1.xml"
    ov.save_model(graph, str(out), compress_to_fp16=False)
    return out


def write_fast_pipeline(path, patch_model, refine_model, *, engine: str = "openvino", **kw) -> Path:
    """Write :func:`fast_pipeline_text` to ``path``; the models must exist.  For FAST's
    OpenVINO engine the pipeline runs batch-1 copies of the models written beside
    ``path`` (:func:`batch_one_copy`)."""
    for model in (patch_model, refine_model):
        if not Path(model).is_file():
            raise ExportError(f"{model}: model file not found")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if engine == "openvino":
        patch_model, refine_model = (batch_one_copy(m, path.parent) for m in (patch_model, refine_model))
    path.write_text(fast_pipeline_text(patch_model, refine_model, engine=engine, **kw))
    return path


def fast_peer(slide_path, patch_model, *, engine: str, repeats: int, work_dir, objective_power: float,
              magnification: float = 10, patch_size: int = 256, tissue_threshold: float = 0.25) -> dict:
    """Time FAST (pyfast) on the same slide and patch model, with the chain of
    :func:`fast_pipeline_text` built through FAST's Python API: the network is loaded
    once, outside the timing, as ours is (a batch-1 copy for FAST's OpenVINO engine,
    which feeds one patch at a time); then one warm-up and ``repeats`` runs of the
    patch-wise stage (slide import, colour-threshold tissue segmentation, patches,
    inference, stitching to the finished heatmap).  FAST's refinement stage is not
    timed: in pyfast 4.18 run headless it does not return.  ``objective_power`` is set
    on the slide when FAST finds no magnification in it.  Patches/s counts the cells of
    FAST's own heatmap that hold a prediction (its tissue mask differs slightly from
    ours).  Returns ``{"skipped": reason}`` when pyfast is not installed or FAST fails."""
    try:
        import fast
    except ImportError as exc:  # not installed, or a system library it needs is missing
        return {"name": "fast", "skipped": f"pyfast cannot be imported ({exc}); {FAST_INSTALL_HINT}"}
    from importlib.metadata import version

    if engine not in FAST_ENGINES:
        raise ExportError(f"FAST engine must be one of {', '.join(FAST_ENGINES)}, got {engine!r}")
    model = batch_one_copy(patch_model, work_dir) if engine == "openvino" else Path(patch_model)
    runs = []
    try:
        network = fast.NeuralNetwork.create(str(model), scaleFactor=1 / 255,
                                            inferenceEngine=FAST_ENGINES[engine])
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            pyramid = fast.WholeSlideImageImporter.create(str(slide_path)).runAndGetOutputData()
            try:
                pyramid.getMagnification()
            except Exception:  # "magnification of this image pyramid is unknown"
                pyramid.setMagnification(float(objective_power))
            tissue = fast.TissueSegmentation.create(useColorThresholdingMethod=True).connect(pyramid)
            patches = fast.PatchGenerator.create(patch_size, patch_size, magnification=magnification,
                                                 overlapPercent=0, maskThreshold=tissue_threshold)
            patches.connect(0, pyramid).connect(1, tissue)
            network.connect(patches)
            stitcher = fast.PatchStitcher.create().connect(network)
            heatmap = fast.RunUntilFinished.create().connect(stitcher).runAndGetOutputData()
            seconds = time.perf_counter() - t0
            cells = np.asarray(heatmap)
            runs.append({"patch_wise": seconds, "patches": int((cells.sum(axis=-1) > 0.5).sum())})
    except Exception as exc:  # FAST raises RuntimeError from C++ for any failure
        return {"name": "fast", "skipped": f"FAST failed: {str(exc).splitlines()[0] if str(exc) else exc}"}
    runs = runs[1:]
    return {
        "name": "fast",
        "engine": f"FAST {FAST_ENGINES[engine]}",
        "version": f"pyfast {version('pyfast')}",
        "device": "GPU" if engine == "tensorrt" else "CPU",
        "precision": "bf16 on CPUs that have it (FAST's OpenVINO default)" if engine == "openvino" else "f32",
        "patches": runs[-1]["patches"],
        "stages": {"patch_wise": mean_sd(r["patch_wise"] for r in runs)},
        "patches_per_second": mean_sd(r["patches"] / r["patch_wise"] for r in runs),
        "runs": runs,
    }
