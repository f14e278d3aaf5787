#!/usr/bin/env python
"""Worker memory over a long cohort: the slope of a worker's memory, slide after slide.

    python tools/bench_memory.py [--slides 100] [--engine openvino|onnxruntime] [--executor process|ray]
                                 [--max-slides-per-worker N] [--warmup 10] [--work DIR] [--json]

One worker (one CPU, one inference thread, one patch reader) segments ``--slides``
slides in a row (the ``tiny`` embedded cohort's six slides of about 4k x 4k px, listed
again and again under distinct ids) with a tiny random MobileNetV2 + U-Net (as
tools/bench_cohort.py builds them; TensorFlow is needed once to build them into
``--work``), through :func:`h2g.export.cohort.run_cohort`: what export/segment_cohort.py
does.  Per slide it reads the worker's peak resident memory during the slide
(``peak_memory_mb``, the cohort.csv column) and its resident memory after it
(``rss_mb``), and prints the least-squares slope of each over the slides after the
first ``--warmup`` (imports, first compilations and caches filling), in MB per slide,
with the first and last values.  A worker that keeps something from every slide shows a
positive slope (the goal is flat: under 1 MB per slide).  Bad input: exit code 2 and a
one-line message.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--slides", type=int, default=100, help="slides segmented by the one worker (default 100)")
    p.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    p.add_argument("--executor", choices=("process", "ray"), default="process")
    p.add_argument("--max-slides-per-worker", type=int, default=None, metavar="N",
                   help="replace the worker after N slides (segment_cohort.py's option)")
    p.add_argument("--warmup", type=int, default=10, help="first slides left out of the slope (default 10)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the cohort, models and outputs (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.slides < args.warmup + 2:
        p.error("--slides must be at least --warmup + 2")
    return args


def slope(values) -> float:
    """Least-squares slope of ``values`` over their index (per slide)."""
    values = np.asarray(values, np.float64)
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def series(rows: list[dict], key: str, warmup: int) -> dict | None:
    """First / last value and slope of ``key`` over the rows after ``warmup``."""
    values = [r.get(key) for r in rows]
    if any(v in (None, "") for v in values):
        return None
    values = [float(v) for v in values]
    kept = values[warmup:]
    return {"first": values[warmup], "last": values[-1], "min": min(kept), "max": max(kept),
            "slope_mb_per_slide": round(slope(kept), 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_cohort import tiny_models  # the same tiny models as the cohort benchmark (tools/ is on the path)

    from h2g.data.cohort import make_cohort
    from h2g.export.cohort import CohortSlide, cohort_slides, run_cohort
    from h2g.export.deploy import Deployment
    from h2g.export.executors import make_executor
    from h2g.inference.segmenter import EngineOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        base = cohort_slides(make_cohort(work / "cohort", "tiny", seed=0, progress=False, only_missing=True))
        slides = [CohortSlide(f"{s.slide_id}-{k // len(base)}", s.path, s.mpp)
                  for k, s in ((k, base[k % len(base)]) for k in range(args.slides))]
        if not all((work / "models" / f"{m}.onnx").is_file() for m in ("patch", "refine")):
            from h2g.core.cli import start_tensorflow

            start_tensorflow(args.verbose)  # building the tiny models needs TensorFlow, once per --work
        onnx = tiny_models(work / "models", base[0].path)
        models = [p.with_suffix(".xml") if args.engine == "openvino" else p for p in onnx]
        plan = Deployment(tuple(models), EngineOptions(engine=args.engine, threads=1), settings={"readers": 1})
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        extra = {"max_slides_per_worker": args.max_slides_per_worker} if args.max_slides_per_worker else {}
        with make_executor(args.executor, workers=1, cpus_per_slide=1, **extra) as executor:
            rows = run_cohort(slides, out, plan, executor, progress=not args.json)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r["slide_id"] for r in rows if r["status"] != "done"]
    if failed:
        print(f"error: {len(failed)} slide(s) failed, e.g. {failed[0]}", file=sys.stderr)
        return 1
    report = {"slides": len(rows), "engine": args.engine, "executor": args.executor, "workers": 1,
              "max_slides_per_worker": args.max_slides_per_worker, "warmup": args.warmup,
              "peak_memory_mb": series(rows, "peak_memory_mb", args.warmup),
              "rss_mb": series(rows, "rss_mb", args.warmup),
              "worker_processes": len({r.get("pid") for r in rows}) if rows[0].get("pid") else None}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['slides']} slides, {args.engine}, one {args.executor} worker"
          + (f" replaced every {args.max_slides_per_worker} slides" if args.max_slides_per_worker else "")
          + f"; slopes over slides {args.warmup + 1}-{report['slides']}:")
    for key, what in (("rss_mb", "resident memory after each slide"), ("peak_memory_mb", "peak memory per slide")):
        s = report[key]
        if s is None:
            print(f"  {what}: not reported by this version")
            continue
        print(f"  {what}: {s['first']:.0f} MB at slide {args.warmup + 1}, {s['last']:.0f} MB at slide "
              f"{report['slides']} (range {s['min']:.0f}-{s['max']:.0f}), slope {s['slope_mb_per_slide']:+.2f} MB "
              "per slide")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
