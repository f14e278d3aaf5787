"""The runtime benchmark (the paper's Table 3): full-slide inference stage by stage
(tissue detection, patch reading, patch inference, stitching, refinement), repeats with
mean and sd, read-only and inference-only times, pipeline efficiency, peak memory and
the engine setup, as JSON and Markdown.  TensorFlow-free."""
from __future__ import annotations

import platform
import resource
import sys
import time

import numpy as np

from h2g.core.errors import ExportError
from h2g.core.resources import available_cores
from h2g.export.deploy import segment
from h2g.inference.backends import Backend
from h2g.inference.heatmap import PatchReader

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
    from h2g.tiling.grid import build_patch_grid

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
                 "cpus": available_cores()},
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
