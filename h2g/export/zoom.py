"""Deployment of RAZN without TensorFlow: its three exported networks (policy, coarse,
fine; each carrying ``system="razn"`` and its role in its metadata) run the conditional
zoom (:func:`h2g.inference.zoom.zoom_segmentation`) over a slide, and its benchmark.

``export/segment_slide.py POLICY COARSE FINE --slide S --out DIR`` reaches
:func:`segment_zoom` through :func:`h2g.export.deploy.deployment_plan` (plan kind
``"razn"``) and writes the sliding-window outputs
(:func:`h2g.export.deploy.write_raster_outputs`) plus the zoom decisions in
``summary.json``; ``export/benchmark.py --model POLICY COARSE FINE`` times it stage by
stage (:func:`benchmark_zoom`, :func:`zoom_markdown`).  TensorFlow-free.
"""
from __future__ import annotations

import logging
import time

from h2g.core.errors import ExportError
from h2g.export.metadata import ModelMetadata
from h2g.inference.zoom import ROLES, zoom_segmentation, zoom_views

log = logging.getLogger(__name__)
ZOOM_STAGES = ("tissue", "reading", "policy", "coarse", "fine", "stitching", "total")
ZOOM_STAGE_LABELS = {
    "tissue": "tissue detection (+ region grid)",
    "reading": "reading x0, and x1 of the zoomed regions",
    "policy": "policy network",
    "coarse": "coarse network (regions not zoomed)",
    "fine": "fine network (zoomed regions, 4 patches each)",
    "stitching": "stitching (+ the raster's weighted average)",
    "total": "total",
}


def is_razn(metas: dict) -> bool:
    """Whether the models' metadata are one RAZN export: roles policy, coarse, fine."""
    return (len(metas) == 3 and all(m is not None and m.system == "razn" for m in metas.values())
            and sorted(m.role for m in metas.values()) == sorted(ROLES))


def by_role(metas: dict) -> dict:
    """``{role: model path}`` of a RAZN export."""
    return {m.role: path for path, m in metas.items()}


def geometry(metadata: ModelMetadata) -> tuple[int, float, float]:
    """``(size, magnification, threshold)`` from a RAZN network's metadata."""
    extras = metadata.extras
    try:
        return int(extras["size"]), float(extras["magnification"]), float(extras.get("threshold", 0.5))
    except KeyError as exc:
        raise ExportError(f"RAZN metadata without {exc}: export the models with export/convert.py") from None


def segment_zoom(slide, policy, coarse, fine, metadata: ModelMetadata | None = None, *, batch_size: int = 8,
                 tissue=None, progress: bool = True):
    """RAZN over ``slide`` with three backends; a
    :class:`h2g.export.deploy.WindowSegmentation` whose timings also hold ``regions``,
    ``zoomed`` and ``zoom_fraction``, and whose metadata lists the views ``x0``, ``x1``."""
    from h2g.export.deploy import WindowSegmentation
    from h2g.tiling.tissue import detect_tissue

    metadata = metadata or coarse.metadata
    if metadata is None:
        raise ExportError(f"{coarse.source}: no RAZN metadata (export with export/convert.py)")
    size, magnification, threshold = geometry(metadata)
    t0 = time.perf_counter()
    if tissue is None:
        tissue = detect_tissue(slide)
    detection = time.perf_counter() - t0
    timings: dict = {}
    raster, stats = zoom_segmentation(slide, policy, coarse, fine, size=size, magnification=magnification,
                                      threshold=threshold, tissue=tissue, batch_size=batch_size,
                                      progress=progress, timings=timings)
    timings["tissue"] += detection
    timings["total"] = time.perf_counter() - t0
    timings["windows"] = timings["regions"]
    timings["zoom_fraction"] = stats.zoom_fraction
    no_tissue = timings["regions"] == 0
    if no_tissue:
        log.warning("%s: no tissue found (no region over tissue); writing empty outputs", slide.path)
    shown = metadata.replace(views=zoom_views(size, magnification))
    return WindowSegmentation(raster, shown, timings, no_tissue, 0.0 if no_tissue else tissue.fraction)


def benchmark_zoom(slide, policy, coarse, fine, metadata=None, *, repeats: int = 10, batch_size: int = 8,
                   progress: bool = False) -> dict:
    """Time :func:`segment_zoom` on ``slide``: one warm-up, then ``repeats`` runs; per stage
    mean and sd, regions/s and the fraction of regions zoomed."""
    from h2g.export.benchmark import ENGINE_FIELDS, host, mean_sd, peak_memory_mib

    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    warm = segment_zoom(slide, policy, coarse, fine, metadata, batch_size=batch_size, progress=progress)
    runs = [segment_zoom(slide, policy, coarse, fine, metadata, batch_size=batch_size,
                         progress=progress).timings for _ in range(repeats)]
    n = warm.timings["regions"]
    info = coarse.info()
    return {
        "slide": str(slide.path), "dimensions": list(slide.dimensions),
        "system": "razn", "design": warm.metadata.design,
        "views": [v.to_dict() for v in warm.metadata.views],
        "regions": n, "zoomed": warm.timings["zoomed"], "zoom_fraction": warm.timings["zoom_fraction"],
        "raster": {"shape": list(warm.raster.shape), "downsample": warm.raster.downsample},
        "batch_size": batch_size, "warmup": 1, "repeats": repeats,
        **{k: info[k] for k in ENGINE_FIELDS},
        "backends": {"policy": policy.info(), "coarse": info, "fine": fine.info()},
        "stages": {s: mean_sd(r[s] for r in runs) for s in ZOOM_STAGES},
        "regions_per_second": mean_sd(n / r["total"] for r in runs) if n else mean_sd([0.0]),
        "peak_memory_mib": peak_memory_mib(),
        "host": host(),
        "runs": runs,
    }


def zoom_markdown(result: dict) -> str:
    """:func:`benchmark_zoom`'s result as Markdown."""
    s = result["stages"]
    cell = lambda st: f"{st['mean']:.2f} ± {st['sd']:.2f}"  # noqa: E731
    views = ", ".join(f"{v['name']} {v['size']} px at {v['magnification']:g}x" for v in result["views"])
    lines = [
        f"# Runtime of RAZN's conditional zoom ({result['design'] or 'razn'})",
        "",
        f"Slide `{result['slide']}` ({result['dimensions'][0]} x {result['dimensions'][1]} px), "
        f"{result['regions']} regions over tissue, {result['zoomed']} zoomed "
        f"({100 * result['zoom_fraction']:.0f} %), views {views}; {result['repeats']} repeats after "
        f"{result['warmup']} warm-up; mean ± sd in seconds.",
        "",
        "| Engine | Device | Precision | Threads | Regions | Regions/s | Total |",
        "|---|---|---|---|---|---|---|",
        f"| {result['engine']} {str(result['version']).split('-')[0]} | {result['device']} | {result['precision']} | "
        f"{result['threads']} | {result['regions']} | {cell(result['regions_per_second'])} | {cell(s['total'])} |",
        "",
        "| Stage | Mean (s) | SD (s) |",
        "|---|---|---|",
        *(f"| {ZOOM_STAGE_LABELS[k]} | {s[k]['mean']:.3f} | {s[k]['sd']:.3f} |" for k in ZOOM_STAGES),
        "",
        f"- peak resident memory: {result['peak_memory_mib']:.0f} MiB",
        "",
    ]
    return "\n".join(lines)

