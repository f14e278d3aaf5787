#!/usr/bin/env python
"""Benchmark cohort inference: slides per hour with 1 and with 2 workers on this machine.

    python tools/bench_cohort.py [--manifest M | --folder F] [--model M... | --patch-model P --refine-model R]
                                 [--executor ray|process] [--engine openvino] [--work DIR] [--json]

Without a cohort, the ``tiny`` preset of the embedded cohort (6 slides of about 4k x 4k px)
is generated into ``--work``; without models, a tiny MobileNetV2 (alpha 0.35, 64 px patches
at 10x) and a tiny U-Net refinement network (256 px, width 1/16) with random weights are
built and exported there (needs TensorFlow; their outputs mean nothing, their cost is
the pipeline's).  Each slide is listed ``--copies`` times (under distinct ids) so that
the workers have a queue.  The cohort is then segmented (:func:`h2g.export.cohort.run_cohort`,
outputs into fresh folders, so nothing is skipped) with 1 and then 2 workers of one CPU
each (inference threads 1, patch readers 1), in one run.  Not timed: the executor's
start-up (a local Ray) and a warm-up of one slide per worker (worker processes starting
and importing the engines: once per cohort, whatever its size).  ``ratio`` =
slides/hour with 2 workers / with 1.  Bad input: exit code 2 and a one-line message on
stderr.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.export.executors import EXECUTORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--manifest", type=Path, default=None, help="cohort manifest (default: tiny preset)")
    source.add_argument("--folder", type=Path, default=None, help="folder of slides instead of a manifest")
    p.add_argument("--model", type=Path, nargs="+", default=[], help="exported models (default: built tiny ones)")
    p.add_argument("--patch-model", type=Path, default=None)
    p.add_argument("--refine-model", type=Path, default=None)
    p.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    p.add_argument("--executor", choices=EXECUTORS, default="auto", help="ray, process or auto (default)")
    p.add_argument("--work", type=Path, default=None, help="folder for the generated cohort, models and outputs "
                                                            "(default: a temporary folder, removed)")
    p.add_argument("--copies", type=int, default=2, help="times each slide is segmented (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def tiny_models(folder: Path, slide_path: Path) -> list[Path]:
    """A tiny random MobileNetV2 patch classifier and U-Net refinement network, exported
    (ONNX + OpenVINO IR with H2G-Net's metadata) into ``folder`` unless already there;
    the .onnx paths."""
    import keras

    from h2g.export.conversion import export_model
    from h2g.io.slide import Slide
    from h2g.models import build

    paths = [folder / "patch.onnx", folder / "refine.onnx"]
    if all(p.is_file() for p in paths):  # made by an earlier run into the same --work
        return paths
    keras.utils.set_random_seed(0)
    models = {"patch": build("mobilenetv2", n_classes=2, input_size=64, alpha=0.35),
              "refine": build("unet", n_classes=2, input_size=256, width=1 / 16)}
    with Slide(slide_path) as slide:
        return [Path(export_model(model, folder, stem, slide)["onnx"]) for stem, model in models.items()]


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.core.resources import available_cores
    from h2g.export.cohort import CohortSlide, cohort_slides, run_cohort
    from h2g.export.deploy import Deployment
    from h2g.export.executors import make_executor
    from h2g.inference.segmenter import EngineOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    try:
        if args.manifest or args.folder:
            slides = cohort_slides(args.manifest or args.folder)
        else:
            from h2g.data.cohort import make_cohort

            slides = cohort_slides(make_cohort(work / "cohort", "tiny", seed=0, progress=False,
                                                       only_missing=True))
        slides = [CohortSlide(f"{s.slide_id}-{k}", s.path, s.mpp) for k in range(max(1, args.copies)) for s in slides]
        models = list(args.model)
        if args.patch_model:
            models = {"patch_classifier": args.patch_model, "refinement": args.refine_model}
        elif not models:
            models = tiny_models(work / "models", slides[0].path)
        plan = Deployment(models if isinstance(models, dict) else tuple(models),
                          EngineOptions(engine=args.engine, threads=1), settings={"readers": 1})
        results, executor_name = {}, None
        for workers in (1, 2):
            out, warm = work / f"out-{workers}", work / f"warm-{workers}"
            for folder in (out, warm):
                shutil.rmtree(folder, ignore_errors=True)
            with make_executor(args.executor, workers=workers, cpus_per_slide=1) as executor:
                executor_name = executor.name
                run_cohort(slides[:workers], warm, plan, executor, progress=False)
                start = time.perf_counter()
                rows = run_cohort(slides, out, plan, executor, progress=False)
                seconds = time.perf_counter() - start
            failed = [r["slide_id"] for r in rows if r["status"] != "done"]
            if failed:
                print(f"error: slides failed with {workers} worker(s): {', '.join(failed)} (see {out}/cohort.csv)",
                      file=sys.stderr)
                return 1
            results[workers] = {"seconds": round(seconds, 2), "slides_per_hour": round(len(rows) / seconds * 3600, 1),
                                "patches": sum(int(r["patches"]) for r in rows),
                                "peak_memory_mb": max(float(r["peak_memory_mb"]) for r in rows)}
        report = {"slides": len(slides), "executor": executor_name, "engine": args.engine,
                  "cpu_cores": available_cores(), "workers": results,
                  "ratio": round(results[2]["slides_per_hour"] / results[1]["slides_per_hour"], 3)}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['slides']} slides ({results[1]['patches']} patches), {report['executor']} executor, "
              f"{report['engine']}, {report['cpu_cores']} cores:")
        for workers, r in results.items():
            print(f"  {workers} worker(s): {r['seconds']:.1f} s, {r['slides_per_hour']:.0f} slides/hour, "
                  f"peak {r['peak_memory_mb']:.0f} MB per slide")
        print(f"  ratio (2 workers / 1): {report['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=True))
