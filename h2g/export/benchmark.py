"""The runtime benchmark (the paper's Table 3) of any system's deployed segmenter:
full-slide inference stage by stage, repeats with mean and sd, read-only and
inference-only times, pipeline efficiency, the ceiling of a perfectly overlapped
pipeline, peak memory and the engine setup, as JSON and Markdown.

The stages, what is counted (patches, windows, regions) and how reading and inference are
timed apart come from the segmenter (:class:`h2g.inference.segmenter.Segmenter`:
``stages``, ``unit``, ``pipeline_stage``, :meth:`~h2g.inference.segmenter.Segmenter.work_alone`);
this module times them the same way for every system.  TensorFlow-free."""
from __future__ import annotations

from h2g.core.errors import ConfigError, ExportError
from h2g.core.measure import Timed, host, mean_sd, peak_memory_mib
from h2g.core.resources import available_cores

ENGINE_FIELDS = ("engine", "version", "device", "threads", "precision")


def efficiency(read_only: float, inference_only: float, pipeline_s: float) -> float | None:
    """(read-only s + inference-only s) / overlapped pipeline s (None for a zero pipeline time)."""
    return (read_only + inference_only) / pipeline_s if pipeline_s > 0 else None


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


def warm_up(run):
    """``run()`` as the warm-up: its warnings are held back (the timed runs that follow
    repeat them), so that a slide without tissue ends in :func:`benchmark`'s one line."""
    import logging

    logging.disable(logging.WARNING)
    try:
        return run()
    finally:
        logging.disable(logging.NOTSET)


def benchmark(segmenter, slide, *, repeats: int = 10, progress: bool = False, say=None) -> dict:
    """Time ``segmenter`` on ``slide``: one warm-up, then ``repeats`` runs of
    :meth:`segment`; per stage mean and sd; items/s over the overlapped reading +
    inference stage (``per_second``) and over the whole run (``total_per_second``); then,
    in the same process, the read-only and inference-only times of the same items
    (:meth:`work_alone`), ``pipeline_efficiency`` = (read-only s + inference-only s) /
    pipeline s and the :func:`ceiling`.  A slide without tissue has nothing to time: an
    :class:`ExportError` says so.  ``progress``: the segmenter's progress bar in every
    timed pass; ``say``: called with a line after the warm-up (its time and what the rest
    will take: a full slide on a small CPU runs for many minutes) and as each pass starts."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    say = say or (lambda line: None)
    with Timed() as warming:  # no bar in the warm-up: a slide without tissue ends in one line (the error)
        warm = warm_up(lambda: segmenter.segment(slide, progress=False))
    if warm.no_tissue or warm.count == 0:
        raise ExportError(f"{slide.path}: no tissue found (no {segmenter.unit} over tissue): nothing to time")
    once = warming.wall
    rest = once * (repeats + 1)
    say(f"warm-up: {warm.count} {segmenter.unit} in {once:.1f} s; {repeats} timed pass(es) and the read-only and "
        f"inference-only passes follow (about {f'{rest / 60:.0f} min' if rest >= 120 else f'{rest:.0f} s'} more)")
    runs = []
    for k in range(repeats):
        say(f"timed pass {k + 1} of {repeats}")
        timings = dict(segmenter.segment(slide, progress=progress).timings)
        timings.update(segmenter.derived_timings(timings))
        runs.append(timings)
    n = warm.count
    stages = {s: mean_sd(r[s] for r in runs) for s in segmenter.stages}
    pipeline_s = stages[segmenter.pipeline_stage]["mean"]
    info = segmenter.main.info()
    result = {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        "system": getattr(segmenter.metadata.get(segmenter.main_role) or next(
            (m for m in segmenter.metadata.values() if m is not None), None), "system", None),
        "design": getattr(next((m for m in segmenter.metadata.values() if m is not None), None), "design", None),
        "segmenter": segmenter.label,
        "unit": segmenter.unit,
        "count": n,
        segmenter.unit: n,
        **segmenter.setup(warm),
        "batch_size": segmenter.batch_size,
        "readers": segmenter.options.readers,
        "warmup": 1,
        "repeats": repeats,
        **{k: info[k] for k in ENGINE_FIELDS},
        "backends": segmenter.info(),
        "stages": stages,
        "per_second": mean_sd(n / r[segmenter.pipeline_stage] for r in runs),
        "total_per_second": mean_sd(n / r["total"] for r in runs),
        "reader": slide.reader,
        "peak_memory_mib": peak_memory_mib(),
        "host": host(),
        "runs": runs,
    }
    say("read-only and inference-only passes")
    alone = segmenter.work_alone(slide, warm)
    if alone is not None:
        read_only, inference_only = alone
        result.update(read_only_s=read_only.wall, inference_only_s=inference_only.wall, pipeline_s=pipeline_s,
                      pipeline_efficiency=efficiency(read_only.wall, inference_only.wall, pipeline_s),
                      ceiling=ceiling(n, read_only, inference_only, pipeline_s, available_cores()))
    if "patch_wise" in stages:  # H2G-Net: the paper's patch-wise stage and the refinement's share
        result["patch_wise_per_second"] = mean_sd(n / r["patch_wise"] for r in runs)
        result["refinement_share"] = stages["refinement"]["mean"] / stages["total"]["mean"]
    return result


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------
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


def _engine_cells(result: dict) -> str:
    """``engine version | device | precision | threads`` of a table row."""
    return (f"{result['engine']} {str(result['version']).split('-')[0]} | {result['device']} | "
            f"{result['precision']} | {result['threads']}")


def _efficiency_lines(result: dict) -> list[str]:
    if "pipeline_efficiency" not in result:
        return []
    eff = result["pipeline_efficiency"]
    lines = [f"- read-only {result['read_only_s']:.3f} s + inference-only {result['inference_only_s']:.3f} s "
             f"vs pipeline {result['pipeline_s']:.3f} s: pipeline efficiency "
             + (f"{eff:.2f}" if eff is not None else "n/a")]
    c = result["ceiling"]
    if c["pipeline_per_s"] is None:
        return lines

    def per_s(value):
        return f"{value:.1f}" if value is not None else "n/a"

    lines.append(
        f"- {result['unit']}/s, measured in this run: read-only {per_s(c['read_only_per_s'])} ({result['reader']} "
        f"reader), inference-only {per_s(c['inference_only_per_s'])}, ceiling of a perfectly overlapped pipeline on "
        f"{c['cores']} cores {per_s(c['ceiling_per_s'])} (max of the stages alone and their CPU seconds "
        f"{c['read_only_cpu_s']:.2f} + {c['inference_only_cpu_s']:.2f} over the cores), pipeline "
        f"{per_s(c['pipeline_per_s'])}: **{c['fraction_of_ceiling']:.2f} of the ceiling**")
    return lines


def _views(result: dict) -> str:
    """``", views x20 64 px at 20x, ..."`` of a result that lists its views."""
    if not result.get("views"):
        return ""
    return ", views " + ", ".join(f"{v['name']} {v['size']} px at {v['magnification']:g}x" for v in result["views"])


def _rate(result: dict) -> dict:
    """The items/s of a result's headline: H2G-Net's over the patch-wise stage, the
    others' over their overlapped pipeline stage."""
    return result.get("patch_wise_per_second") or result["per_second"]


def benchmark_markdown(result: dict, stage_labels: dict, headline=(), peer: dict | None = None) -> str:
    """A benchmark in the layout of the paper's Table 3: one row per engine run
    (``result``, its ``int8`` twin timed in the same run, and a ``peer`` such as FAST),
    the ``headline`` stages and the total (mean ± sd seconds) and items/s; then the
    per-stage breakdown, the overlap figures and the speed-ups measured in the run.
    ``headline``: ``(stage, column title)`` pairs."""
    unit = result["unit"]
    int8 = result.get("int8")
    head = ["Engine", "Device", "Precision", "Threads", unit.capitalize(), f"{unit.capitalize()}/s",
            *(title for _, title in headline), "Total"]
    name = " ".join(x for x in ((result.get("system") or "").upper(), result.get("design")) if x)
    lines = [f"# Runtime of {result['segmenter']}" + (f" ({name})" if name else ""), "",
             f"Slide `{result['slide']}` ({result['dimensions'][0]} x {result['dimensions'][1]} px), "
             f"{result['count']} {unit}" + _views(result) + f"; {result['repeats']} repeats after {result['warmup']} "
             "warm-up; mean ± sd in seconds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(r: dict) -> str:
        cells = [_cell(r["stages"][k]) for k, _ in headline]
        return (f"| {_engine_cells(r)} | {r['count']} | {_cell(_rate(r))} | "
                + " | ".join(cells + [_cell(r["stages"]["total"])]) + " |")

    lines.append(row(result))
    if int8 is not None:
        lines.append(row(int8))
    if peer is not None:
        cells = [_cell(peer["stages"][k]) if k in peer["stages"] else "not timed"
                 for k in (*(k for k, _ in headline), "total")]
        lines.append(f"| {peer['engine']} ({peer['version']}) | {peer['device']} | {peer['precision']} | "
                     f"{peer.get('threads') or '-'} | {peer.get(unit, peer.get('count', '-'))} | "
                     f"{_cell(peer['per_second'])} | " + " | ".join(cells) + " |")
    lines += ["", "| Stage | Mean (s) | SD (s) |", "|---|---|---|",
              *(f"| {stage_labels[k]} | {result['stages'][k]['mean']:.3f} | {result['stages'][k]['sd']:.3f} |"
                for k in result["stages"])]
    lines += ["", f"- {unit}/s: {_cell(result['per_second'])} over reading + inference (overlapped); "
                  f"{_cell(result['total_per_second'])} over the whole run"]
    if "patch_wise_per_second" in result:
        lines.append(f"- {unit}/s over the whole patch-wise stage (tissue detection to heatmap): "
                     f"{_cell(result['patch_wise_per_second'])}; refinement share of total: "
                     f"{100 * result['refinement_share']:.2f} %")
    if "zoom_fraction" in result:
        lines.append(f"- {result['zoomed']} of {result['count']} regions zoomed "
                     f"({100 * result['zoom_fraction']:.0f} %)")
    if peer is not None:
        lines.append(f"- peer {peer['engine']}: {_cell(peer['per_second'])} {unit}/s ({peer.get(unit, '-')} "
                     f"{unit}): ours is {_rate(result)['mean'] / peer['per_second']['mean']:.2f}x")
    lines += _efficiency_lines(result)
    lines += [f"- {role}: {_engine_setup(info)}" for role, info in result["backends"].items()]
    lines += [f"- batch {result['batch_size']}, {result['readers']} reader threads; peak resident memory: "
              f"{result['peak_memory_mib']:.0f} MiB", ""]
    if int8 is not None:
        ours, theirs = _rate(result)["mean"], _rate(int8)["mean"]
        lines += [f"## int8 models ({', '.join(i['model'] for i in int8['backends'].values())})", "",
                  "| Stage | Mean (s) | SD (s) |", "|---|---|---|",
                  *(f"| {stage_labels[k]} | {int8['stages'][k]['mean']:.3f} | {int8['stages'][k]['sd']:.3f} |"
                    for k in int8["stages"]), "",
                  f"- {unit}/s: {_cell(_rate(int8))}: **{theirs / ours:.2f}x** the {result['precision']} models'"]
        if peer is not None:
            lines.append(f"- int8 vs peer {peer['engine']} ({peer['precision']}): "
                         f"**{theirs / peer['per_second']['mean']:.2f}x** {unit}/s")
        lines += _efficiency_lines(int8) + [""]
    return "\n".join(lines)
