#!/usr/bin/env python
"""Segment every slide of a manifest or a folder with exported models, one Ray task per slide.

    python export/segment_cohort.py MANIFEST_OR_FOLDER --model M... --out DIR [--workers N]
    python export/segment_cohort.py MANIFEST --patch-model P.onnx --refine-model R.onnx --out DIR
    ray start --head ...; python export/segment_cohort.py MANIFEST --model M... --out DIR --address auto

Each slide is segmented exactly as export/segment_slide.py does (the models' metadata says
what runs) into ``DIR/<slide_id>/``.  With no ``--address`` a local Ray is started on this
machine (``--workers`` slides at once); ``--address auto|HOST:PORT`` joins a cluster started
with ``ray start`` (the slides, the models and DIR must then be on a file system every node
sees, and h2g installed on every node).  Without Ray installed (``pip install '.[cluster]'``)
the slides run in a local process pool with the same outputs (``--executor process`` forces it).

``DIR/cohort.csv``: one row per slide (status done / skipped / failed, attempts, seconds,
patches or windows, tumour area in mm^2, peak memory in MB, warning, error).  A rerun skips
the slides whose outputs are complete; a failing slide is retried once, then recorded, and
the others go on.  One run at a time per DIR (a lock file; a second run is refused).
Ctrl-C stops the workers, records the finished slides and exits with 130 (the same command
resumes).  Exit code 1 when any slide failed (the summary names them), 2 on bad input (one
line on stderr).  See :mod:`h2g.export.cohort`.
"""
from __future__ import annotations

import os
import signal
import sys


def _exit_130(signum, frame):  # Ctrl-C while the imports below run: exit 130 at once (run_cli takes over after)
    os.write(2, b"interrupted\n")
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _exit_130)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from h2g.core.cli import add_verbose_argument, run_cli  # noqa: E402
from h2g.core.outputs import check_output_dir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    # imported here, inside run_cli: a Ctrl-C while the engines load is an interrupt (130), not a traceback
    from h2g.export.deploy import add_deploy_arguments
    from h2g.export.executors import EXECUTORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("source", type=Path, help="manifest CSV (every split unless --split) or folder of slides")
    p.add_argument("--model", type=Path, nargs="+", action="extend", default=[],
                   help="exported models (.onnx / .xml) of one system: what runs comes from their metadata")
    add_deploy_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per slide)")
    p.add_argument("--split", default=None, help="only this split of the manifest")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="ray, process (a local process pool) or auto (ray when installed; default)")
    p.add_argument("--workers", type=int, default=None,
                   help="slides at once on this machine (local Ray or the pool; default: cores / cpus-per-slide)")
    p.add_argument("--cpus-per-slide", type=float, default=1,
                   help="CPUs each slide's task asks for, also its inference threads unless --threads (default 1)")
    p.add_argument("--gpus-per-slide", type=float, default=0, help="GPUs each slide's task asks for (Ray; default 0)")
    p.add_argument("--memory-per-slide", type=float, default=None,
                   help="GiB of memory each slide's task asks for (Ray; default: no request)")
    p.add_argument("--max-slides-per-worker", type=int, default=None, metavar="N",
                   help="replace each worker process after N slides (Ray: max_calls; the process pool: "
                        "max_tasks_per_child), a bound on anything a worker accumulates (default: never)")
    p.add_argument("--retries", type=int, default=1, help="retries of a failing slide (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.cpus_per_slide <= 0 or args.gpus_per_slide < 0 or (args.workers is not None and args.workers < 1):
        p.error("--cpus-per-slide must be > 0, --gpus-per-slide >= 0 and --workers >= 1")
    if args.max_slides_per_worker is not None and args.max_slides_per_worker < 1:
        p.error("--max-slides-per-worker must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out)  # before the models load
    import dataclasses

    from h2g.core.resources import available_cores
    from h2g.export.cohort import cohort_slides, run_cohort, summary_lines
    from h2g.export.deploy import deployment
    from h2g.export.executors import make_executor

    slides = cohort_slides(args.source, args.split)
    plan = deployment(args, args.model)
    # Inference threads: the task's CPUs, not the whole node's.
    plan = dataclasses.replace(plan, engine=dataclasses.replace(
        plan.engine, threads=args.threads or max(1, int(args.cpus_per_slide))))
    workers = args.workers or max(1, int(available_cores() // args.cpus_per_slide))
    used = []

    def executor():
        used.append(make_executor(args.executor, address=args.address, workers=workers,
                                  cpus_per_slide=args.cpus_per_slide, gpus_per_slide=args.gpus_per_slide,
                                  memory_per_slide=args.memory_per_slide,
                                  max_slides_per_worker=args.max_slides_per_worker))
        return used[-1]

    rows = run_cohort(slides, args.out, plan, executor, retries=args.retries, progress=not args.quiet)
    print(f"cohort of {args.source}" + (f" on {used[0].name}:" if used else " (nothing left to run):"))
    print("\n".join(summary_lines(rows, args.out)))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
