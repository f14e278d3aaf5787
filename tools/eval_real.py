#!/usr/bin/env python
"""Score a trained H2G-Net run on real breast-cancer tissue: the three BCSS regions.

    python tools/eval_real.py runs/mob_pw_unet
    python tools/eval_real.py runs/mob_pw_unet --real-data ../shared/data/real --out /tmp/bcss
    python tools/eval_real.py runs/mob_pw_unet --keep-slides     # also keep the TIFFs in OUT/real_bcss_slides/

RUN_DIR is a finished run of a patch-classifier + refinement design (``mob_pw_unet``,
``mob_pw_agunet``, ...: ``config.json``, ``metrics.json``, ``models/*.keras``) made by
``experiments/run.py``.  Each region of ``REAL/bcss_roi/images`` (0.25 um/px JPEGs) is
written as a 0.25 um/px pyramidal TIFF (a temporary folder, deleted afterwards), checked
to read back at that scale with the JPEG's pixels, and segmented with the run's models
and settings exactly as the pipeline segments cohort slides (h2g.evaluation.real).  The
prediction is the refinement resolution (``refine.size`` squared, over the region's
extent); the truth (``masks/<id>.jpg``, grey > 127; or a QuPath GeoJSON / ASAP / Aperio XML
of the same name in ``masks/``, in the region's pixels) is area-averaged onto it and
thresholded at 0.5.

Writes ``OUT/real_bcss.csv`` (one row per region: Dice, recall, precision, predicted and
true tumour shares, the heatmap's own Dice and share), ``OUT/real_bcss.json`` (the same,
the mean Dice, the settings) and ``OUT/real_bcss.png`` (image | truth | heatmap |
prediction per region); OUT defaults to RUN_DIR.  Bad input: exit code 2, one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from h2g.core.cli import add_verbose_argument, preload_tensorflow_quietly, require_training_stack, run_cli
from h2g.core.outputs import check_output_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = Path(os.environ.get("H2G_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder, e.g. runs/mob_pw_unet")
    p.add_argument("--real-data", type=Path, default=DEFAULT_REAL_DATA,
                   help=f"real-data folder holding bcss_roi/ (default: $H2G_REAL_DATA or {DEFAULT_REAL_DATA})")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR)")
    p.add_argument("--keep-slides", action="store_true",
                   help="keep the regions' TIFFs in OUT/real_bcss_slides/ (default: a temporary folder)")
    add_verbose_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.evaluation import real
    from h2g.systems.h2g import runs

    start = time.perf_counter()
    run = runs.load_run(args.run_dir)  # fast checks first: before TensorFlow starts
    regions = real.bcss_regions(args.real_data)
    out = args.out if args.out is not None else run.folder
    check_output_dir(out)
    require_training_stack("eval_real.py")
    if not args.verbose:
        preload_tensorflow_quietly()
    predictor = runs.RunPredictor(run)

    def report(result) -> None:
        row = result.row
        print(f"{row['region']}: Dice {row['dice']:.3f}, predicted tumour {100 * row['pred_share']:.1f} %, "
              f"true {100 * row['true_share']:.1f} % ({row['seconds']:.1f} s)", flush=True)

    results = real.evaluate(regions, predictor, threshold=run.threshold,
                            slide_dir=out / "real_bcss_slides" if args.keep_slides else None, progress=report)
    seconds = time.perf_counter() - start
    paths = real.write_outputs(
        out, results, run=str(run.folder.resolve()), design=run.design, real_data=str(args.real_data.resolve()),
        resolution=[run.size, run.size], threshold=run.threshold, mpp=real.BCSS_MPP,
        magnification=run.setting("patches", "magnification"), patch_size=run.setting("patches", "patch_size"),
        seconds=round(seconds, 2))
    print()
    print(f"{run.design} on BCSS (truth and prediction at {run.size}x{run.size} over each region; "
          f"threshold {run.threshold:g})")
    print(real.format_table(results))
    print(f"\nwrote {paths['csv']}, {paths['json'].name}, {paths['figure'].name} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
