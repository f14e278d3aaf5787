"""Run designs of the paper's ablation end to end.

    python experiments/run.py --design mob_pw_unet            # smoke preset, embedded cohort
    python experiments/run.py --design all --preset paper --manifest my_slides.csv --out runs/paper

Every stage a design needs runs (cluster model, patch classifier, heatmaps, refinement),
stage outputs whose inputs did not change are reused, and ``OUT/NAME/metrics.json`` plus
tables and figures are written.  A bad manifest exits with code 2 and lists every bad row
before any work starts.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from h2g.core.cli import run_cli
from h2g.core.config import PRESETS, load_config
from h2g.systems.h2g.designs import DESIGNS, resolve
from h2g.io.manifest import DEFAULT_MANIFEST


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", required=True, choices=[*DESIGNS, "all"], help="design name or 'all'")
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                   help="slide manifest CSV (default: the embedded cohort, generated on first use)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default: runs/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue interrupted training stages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from h2g.io.manifest import load_manifest

    if args.manifest.resolve() == DEFAULT_MANIFEST.resolve():
        from h2g.data.cohort import ensure_cohort

        ensure_cohort(args.manifest, seed=0)
    load_manifest(args.manifest)  # every bad row, before any work starts
    from h2g.systems.h2g.pipeline import run_designs

    config = load_config(args.preset, seed=args.seed)
    results = run_designs(resolve(args.design), args.manifest, args.out, config, resume=args.resume)
    print(f"\n{'design':<20} {'recall':>8} {'precision':>10} {'dice':>14}  (test slides, {config.refine.size}x{config.refine.size})")
    for name, m in results.items():
        print(f"{m['label']:<20} {m['recall_mean']:>8.3f} {m['precision_mean']:>10.3f} "
              f"{m['dice_mean']:>7.3f} ± {m['dice_sd']:.3f}")
    print(f"\nresults in {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
