"""The runtime benchmark (the paper's Table 3): full-slide inference stage by stage
(tissue detection, patch reading, patch inference, stitching, refinement), repeats with
mean and sd, read-only and inference-only times, pipeline efficiency, peak memory and
the engine setup, as JSON and Markdown.  :func:`benchmark` times H2G-Net (patch
classifier + refinement network), :func:`benchmark_windows` a sliding-window
segmentation model whose metadata names its views (DMMN, ...).  TensorFlow-free."""
from __future__ import annotations

import platform
import resource
import sys
import time

import numpy as np

from h2g.core.errors import ExportError
from h2g.core.resources import available_cores
from h2g.export.deploy import segment, segment_windows
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
WINDOW_STAGES = ("tissue", "reading", "inference", "waiting", "stitching", "window_pipeline", "total")
WINDOW_STAGE_LABELS = {
    "tissue": "tissue detection (+ model probe, window grid)",
    "reading": "window reading, every view (busy s, summed over readers)",
    "inference": "inference (busy s)",
    "waiting": "inference waiting for the readers",
    "stitching": "stitching and blending",
    "window_pipeline": "window reading + inference (wall, overlapped; stitches each batch)",
    "total": "total",
}
ENGINE_FIELDS = ("engine", "version", "device", "threads", "precision")


def mean_sd(values) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(list(values), np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd}


def peak_memory_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def host() -> dict:
    """Python version, machine and the CPU cores this process may use."""
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": available_cores()}


def efficiency(read_only: float, inference_only: float, pipeline_s: float) -> float | None:
    """(read-only s + inference-only s) / overlapped pipeline s (None for a zero pipeline time)."""
    return (read_only + inference_only) / pipeline_s if pipeline_s > 0 else None


class Timed:
    """Wall and process CPU seconds (every thread) of a ``with`` block."""

    wall = cpu = 0.0  # nothing timed yet

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def ceiling(n: int, read_only: Timed, inference_only: Timed, pipeline_s: float, cores: int) -> dict:
    """The best a perfectly overlapped reading + inference pipeline could do on ``cores``
    cores, from the two stages timed alone in the same run: it cannot be faster than
    either stage alone, nor do both stages' CPU work in less than their CPU seconds spread
    over every core, so ``ceiling_s = max(read-only s, inference-only s, (read CPU s +
    inference CPU s) / cores)``.  Returns items/s of each stage alone, of the ceiling and
    of the pipeline, and the pipeline's fraction of the ceiling (ceiling s / pipeline s).
    An engine that spins idle threads inflates its CPU seconds, which lowers the ceiling:
    a fraction above 1 says so."""
    ceiling_s = max(read_only.wall, inference_only.wall, (read_only.cpu + inference_only.cpu) / max(1, cores))

    def rate(seconds: float) -> float | None:
        return n / seconds if seconds > 0 else None

    return {
        "cores": cores,
        "read_only_per_s": rate(read_only.wall),
        "inference_only_per_s": rate(inference_only.wall),
        "read_only_cpu_s": read_only.cpu,
        "inference_only_cpu_s": inference_only.cpu,
        "ceiling_s": ceiling_s,
        "ceiling_per_s": rate(ceiling_s),
        "pipeline_per_s": rate(pipeline_s),
        "fraction_of_ceiling": ceiling_s / pipeline_s if pipeline_s > 0 else None,
    }


def read_only_seconds(slide, coords: np.ndarray, *, magnification: float, patch_size: int,
                      batch_size: int, readers: int) -> Timed:
    """Wall and CPU seconds to read every patch at ``coords`` with the pipeline's readers,
    no inference."""
    with Timed() as timed, PatchReader(slide, coords, magnification=magnification, patch_size=patch_size,
                                       batch_size=batch_size, readers=readers) as reader:
        for _ in reader:
            pass
    return timed


def _head(batch, n: int):
    """The first ``n`` samples of a batch: an array or ``{input name: array}``."""
    return {k: v[:n] for k, v in batch.items()} if isinstance(batch, dict) else batch[:n]


def inference_only_seconds(backend: Backend, batch, n_patches: int, batch_size: int) -> Timed:
    """Wall and CPU seconds to predict ``n_patches`` patches in batches of ``batch_size``
    from memory (``batch``, an array or ``{input name: array}`` of ``batch_size`` samples,
    repeated; the last batch partial as in the pipeline)."""
    full, rest = divmod(n_patches, batch_size)
    with Timed() as timed:
        for _ in range(full):
            backend.predict(batch)
        if rest:
            backend.predict(_head(batch, rest))
    return timed


def benchmark(slide, patch_backend: Backend, refine_backend: Backend, *, repeats: int = 10,
              size: int = 1024, magnification: float = 10, patch_size: int = 256,
              heatmap_stride: int | None = None, batch_size: int = 32, readers: int = 2,
              progress: bool = False) -> dict:
    """Time :func:`segment` on ``slide``: one warm-up, then ``repeats`` runs; then, in the
    same process, the read-only time (all patches read, no inference) and the
    inference-only time (the same number of patches from memory).
    ``pipeline_efficiency`` = (read-only s + inference-only s) / pipeline s, where
    pipeline s is the mean wall time of the overlapped reading + inference (>= 1 when the
    overlap is perfect on cores both stages keep busy).  ``heatmap_stride``: as
    :func:`segment` (None: the paper's non-overlapping patches)."""
    from h2g.data.readers import read_patch
    from h2g.inference.heatmap import heatmap_grid

    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    kw = dict(size=size, magnification=magnification, patch_size=patch_size, heatmap_stride=heatmap_stride,
              batch_size=batch_size, readers=readers, progress=progress)
    warm = segment(slide, patch_backend, refine_backend, **kw)
    runs = []
    for _ in range(repeats):
        timings = segment(slide, patch_backend, refine_backend, **kw).timings
        timings["patch_wise"] = timings["tissue"] + timings["patch_pipeline"] + timings["stitching"]
        runs.append(timings)
    grid, corners = heatmap_grid(slide, warm.heatmap.tissue, magnification=magnification, patch_size=patch_size,
                                 stride=heatmap_stride)
    n = len(corners)
    read_only = read_only_seconds(slide, corners, magnification=magnification, patch_size=patch_size,
                                  batch_size=batch_size, readers=readers)
    inference_only = Timed()
    if n:
        batch = np.stack([read_patch(slide, int(x), int(y), magnification=magnification, patch_size=patch_size)
                          for x, y in corners[:batch_size]]).astype(np.float32) / 255.0
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
        "heatmap_stride": heatmap_stride or patch_size,
        "batch_size": batch_size,
        "readers": readers,
        "refinement_size": size,
        "warmup": 1,
        "repeats": repeats,
        **{k: info[k] for k in ENGINE_FIELDS},
        "patch_backend": info,
        "refine_backend": refine_backend.info(),
        "stages": stages,
        "patches_per_second": mean_sd(n / r["patch_pipeline"] for r in runs),
        "patch_wise_patches_per_second": mean_sd(n / r["patch_wise"] for r in runs),
        "read_only_s": read_only.wall,
        "inference_only_s": inference_only.wall,
        "pipeline_s": pipeline_s,
        "pipeline_efficiency": efficiency(read_only.wall, inference_only.wall, pipeline_s),
        "ceiling": ceiling(n, read_only, inference_only, pipeline_s, available_cores()),
        "reader": slide.reader,
        "refinement_share": stages["refinement"]["mean"] / stages["total"]["mean"],
        "peak_memory_mib": peak_memory_mib(),
        "host": host(),
        "runs": runs,
    }


def read_windows_seconds(slide, centres: np.ndarray, views, *, batch_size: int, readers: int) -> Timed:
    """Wall and CPU seconds to read every view of the windows around ``centres`` in
    batches on the pipeline's reader pool, as far ahead as the pipeline reads (2 batches
    per reader), no inference."""
    from h2g.data.readers import ReadAhead
    from h2g.inference.sliding import read_window_batch

    with Timed() as timed, ReadAhead(lambda start: read_window_batch(slide, centres[start:start + batch_size], views),
                                     range(0, len(centres), batch_size), readers=readers,
                                     depth=2 * readers) as batches:
        for _ in batches:
            pass
    return timed


def _window_setup(warm, grid, stride: int | None, keep: int | None, blend: str) -> dict:
    """What a sliding-window run segmented: the model's system / design, views, the
    window geometry and the raster."""
    meta, target = warm.metadata, warm.metadata.view()
    stride = stride or target.size
    return {
        "system": meta.system, "design": meta.design, "role": meta.role,
        "views": [v.to_dict() for v in meta.views], "target_view": target.name,
        "classes": meta.class_names or [f"class{i}" for i in range(warm.raster.classes)],
        "stride": stride, "keep": (keep or stride) if blend == "centre" else None, "blend": blend,
        "windows": len(grid), "grid_shape": list(grid.grid_shape),
        "raster": {"shape": list(warm.raster.shape), "downsample": warm.raster.downsample},
    }


def benchmark_windows(slide, backend: Backend, metadata=None, *, repeats: int = 10, stride: int | None = None,
                      keep: int | None = None, blend: str = "centre", magnification: float | None = None,
                      patch_size: int | None = None, batch_size: int = 8, readers: int = 2,
                      progress: bool = False) -> dict:
    """Time :func:`segment_windows` (a model whose ``metadata``, default the backend's,
    names its views) on ``slide``: one warm-up, then ``repeats`` runs; then the
    read-only time (every view of every window read on the same reader pool, no
    inference) and the inference-only time (the same number of windows from memory).
    ``pipeline_efficiency`` = (read-only s + inference-only s) / pipeline s, pipeline s
    being the mean wall time of the overlapped reading + inference (which also stitches
    each batch).  ``windows_per_second`` is over that overlapped stage."""
    from h2g.inference.sliding import feed_for, plan_windows, read_window_batch

    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    kw = dict(stride=stride, keep=keep, blend=blend, magnification=magnification, patch_size=patch_size,
              batch_size=batch_size, readers=readers, progress=progress)
    warm = segment_windows(slide, backend, metadata, **kw)
    runs = [segment_windows(slide, backend, metadata, **kw).timings for _ in range(repeats)]
    views = warm.metadata.views  # as run, after any --magnification / --patch-size override
    # the windows the runs segmented (plan_windows is the pipeline's own geometry; the
    # tissue mask is detected again here, outside the timed runs)
    grid = plan_windows(slide, backend, views, warm.metadata.view(), stride=stride, keep=keep, blend=blend).grid
    n = len(grid)
    if n != warm.timings["windows"]:
        raise ExportError(f"{backend.source}: the benchmark's window grid has {n} windows, the pipeline ran "
                          f"{warm.timings['windows']}")
    read_only = read_windows_seconds(slide, grid.centres, views, batch_size=batch_size, readers=readers)
    inference_only = Timed()
    if n:
        feed = feed_for(backend, read_window_batch(slide, grid.centres[:batch_size], views))
        inference_only = inference_only_seconds(backend, feed, n, batch_size)
    stages = {s: mean_sd(r[s] for r in runs) for s in WINDOW_STAGES}
    pipeline_s = stages["window_pipeline"]["mean"]
    info = backend.info()
    return {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        **_window_setup(warm, grid, stride, keep, blend),
        "batch_size": batch_size,
        "readers": readers,
        "warmup": 1,
        "repeats": repeats,
        **{k: info[k] for k in ENGINE_FIELDS},
        "backend": info,
        "stages": stages,
        "windows_per_second": mean_sd(n / r["window_pipeline"] for r in runs),
        "read_only_s": read_only.wall,
        "inference_only_s": inference_only.wall,
        "pipeline_s": pipeline_s,
        "pipeline_efficiency": efficiency(read_only.wall, inference_only.wall, pipeline_s),
        "ceiling": ceiling(n, read_only, inference_only, pipeline_s, available_cores()),
        "reader": slide.reader,
        "peak_memory_mib": peak_memory_mib(),
        "host": host(),
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


def _stage_table(stages: dict, keys, labels: dict) -> list[str]:
    """Markdown lines: a blank line, then one row per stage (mean, sd)."""
    return ["", "| Stage | Mean (s) | SD (s) |", "|---|---|---|",
            *(f"| {labels[k]} | {stages[k]['mean']:.3f} | {stages[k]['sd']:.3f} |" for k in keys)]


def _efficiency_line(result: dict, unit: str = "patches") -> str:
    eff = result["pipeline_efficiency"]
    line = (f"- read-only {result['read_only_s']:.3f} s + inference-only {result['inference_only_s']:.3f} s "
            f"vs pipeline {result['pipeline_s']:.3f} s: pipeline efficiency "
            + (f"{eff:.2f}" if eff is not None else "n/a"))
    c = result.get("ceiling")
    if not c or c["pipeline_per_s"] is None:
        return line

    def per_s(value):
        return f"{value:.1f}" if value is not None else "n/a"

    return line + "\n" + (
        f"- {unit}/s, measured in this run: read-only {per_s(c['read_only_per_s'])} ({result['reader']} reader), "
        f"inference-only {per_s(c['inference_only_per_s'])}, ceiling of a perfectly overlapped pipeline on "
        f"{c['cores']} cores {per_s(c['ceiling_per_s'])} (max of the stages alone and their CPU seconds "
        f"{c['read_only_cpu_s']:.2f} + {c['inference_only_cpu_s']:.2f} over the cores), pipeline "
        f"{per_s(c['pipeline_per_s'])}: **{c['fraction_of_ceiling']:.2f} of the ceiling**")


def _engine_cells(result: dict) -> str:
    """``engine version | device | precision | threads`` of a table row."""
    return (f"{result['engine']} {result['version'].split('-')[0]} | {result['device']} | "
            f"{result['precision']} | {result['threads']}")


def benchmark_markdown(result: dict, peer: dict | None = None) -> str:
    """The benchmark in the layout of the paper's Table 3 (Patch-wise, Refinement, Total:
    mean ± sd seconds), followed by the per-stage breakdown and the overlap figures.
    ``peer`` (same keys, e.g. FAST's timings) adds a row; ``result["int8"]`` (the same
    benchmark of the int8 models, timed in the same run) adds a row, its breakdown and
    its speed-ups over the given models and the peer."""
    s = result["stages"]
    int8 = result.get("int8")
    lines = [
        "# Runtime of the H2G-Net pipeline (layout of the paper's Table 3)",
        "",
        f"Slide `{result['slide']}` ({result['dimensions'][0]} x {result['dimensions'][1]} px, "
        f"{result['patches']} patches of {result['patch_size']} px at {result['magnification']:g}x"
        + (f", {result['heatmap_stride']} px apart" if result.get("heatmap_stride", result["patch_size"])
           != result["patch_size"] else "") + "), "
        f"{result['repeats']} repeats after {result['warmup']} warm-up; mean ± sd in seconds.",
        "",
        "| Engine | Device | Precision | Threads | Patch-wise | Refinement | Total |",
        "|---|---|---|---|---|---|---|",
        f"| {_engine_cells(result)} | {_cell(s['patch_wise'])} | {_cell(s['refinement'])} | {_cell(s['total'])} |",
    ]
    if int8 is not None:
        t = int8["stages"]
        lines.append(f"| {_engine_cells(int8)} | {_cell(t['patch_wise'])} | {_cell(t['refinement'])} | "
                     f"{_cell(t['total'])} |")
    if peer is not None:
        ps = peer["stages"]
        cells = [_cell(ps[k]) if k in ps else "not timed" for k in ("patch_wise", "refinement", "total")]
        lines.append(f"| {peer['engine']} ({peer['version']}) | {peer['device']} | {peer['precision']} | "
                     f"{peer.get('threads') or '-'} | {' | '.join(cells)} |")
    lines += _stage_table(s, STAGES, STAGE_LABELS)
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
        _efficiency_line(result),
        f"- refinement share of total: {100 * result['refinement_share']:.2f} %",
        f"- patch classifier: {_engine_setup(result['patch_backend'])}; refinement: "
        f"{_engine_setup(result['refine_backend'])}; batch {result['batch_size']}, "
        f"{result['readers']} reader threads",
        f"- peak resident memory: {result['peak_memory_mib']:.0f} MiB",
        "",
    ]
    if int8 is not None:
        ours = result["patch_wise_patches_per_second"]["mean"]
        theirs = int8["patch_wise_patches_per_second"]["mean"]
        lines += [f"## int8 models ({int8['patch_backend']['model']}, {int8['refine_backend']['model']})",
                  *_stage_table(int8["stages"], STAGES, STAGE_LABELS), "",
                  f"- patches/s over the patch-wise stage: {_cell(int8['patch_wise_patches_per_second'])}: "
                  f"**{theirs / ours:.2f}x** the {result['precision']} models'"]
        if peer is not None:
            lines.append(f"- int8 vs peer {peer['engine']} ({peer['precision']}): "
                         f"**{theirs / peer['patches_per_second']['mean']:.2f}x** patches/s")
        lines += [_efficiency_line(int8), ""]

    return "\n".join(lines)


def _model_name(result: dict) -> str:
    """``"DMMN dmmn_m3"``: the system (upper case) and design, else the model file."""
    name = " ".join(x for x in ((result["system"] or "").upper(), result["design"]) if x)
    return name or result["backend"]["model"]


def windows_markdown(result: dict) -> str:
    """A sliding-window benchmark (:func:`benchmark_windows`) as Markdown: the engine row
    (windows, windows/s, total), the per-stage breakdown and the overlap figures."""
    s = result["stages"]
    views = ", ".join(f"{v['name']} {v['size']} px at {v['magnification']:g}x" for v in result["views"])
    raster = result["raster"]
    return "\n".join([
        f"# Runtime of sliding-window segmentation ({_model_name(result)})",
        "",
        f"Slide `{result['slide']}` ({result['dimensions'][0]} x {result['dimensions'][1]} px), "
        f"{result['windows']} windows over tissue (stride {result['stride']} px of view {result['target_view']}, "
        f"blend {result['blend']}), views {views}; raster {raster['shape'][1]} x {raster['shape'][0]} at "
        f"downsample {raster['downsample']:g}; {result['repeats']} repeats after {result['warmup']} warm-up; "
        "mean ± sd in seconds.",
        "",
        "| Engine | Device | Precision | Threads | Windows | Windows/s | Total |",
        "|---|---|---|---|---|---|---|",
        f"| {_engine_cells(result)} | {result['windows']} | {_cell(result['windows_per_second'])} | "
        f"{_cell(s['total'])} |",
        *_stage_table(s, WINDOW_STAGES, WINDOW_STAGE_LABELS),
        "",
        f"- windows/s: {_cell(result['windows_per_second'])} over reading + inference (overlapped)",
        _efficiency_line(result, "windows"),
        f"- model: {_engine_setup(result['backend'])}; batch {result['batch_size']}, "
        f"{result['readers']} reader threads",
        f"- peak resident memory: {result['peak_memory_mib']:.0f} MiB",
        "",
    ])
