#!/usr/bin/env python
"""The Dice a perfect patch classifier's heatmap would reach on a manifest's slides, per
heatmap stride: the ceiling the patch grid puts on the patch-wise designs.

    python tools/heatmap_ceiling.py                          # data_manifest.csv, test split, smoke settings
    python tools/heatmap_ceiling.py --strides 256 128 64 --split val
    python tools/heatmap_ceiling.py --preset paper --manifest my_cohort.csv

"soft": every patch gets its true tumour fraction; "label": its training label (fraction
> patches.tumour_threshold).  Rasterised at refine.size and scored at 0.5 like the
pipeline's heatmaps (h2g.evaluation.heatmap_ceiling).  Prints the mean Dice over the
split's annotated slides per stride.  Bad input: exit code 2, one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from h2g.core.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=REPO / "data_manifest.csv")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--preset", default="smoke", help="settings: patch size, magnification, refinement size")
    p.add_argument("--strides", type=int, nargs="+", default=None,
                   help="px at the patch magnification (default: the patch size and half of it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from h2g.systems.registry import load_config
    from h2g.core.errors import ConfigError
    from h2g.evaluation.heatmap_ceiling import slide_ceiling
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import open_slide

    c = load_config(args.preset)
    records = [r for r in load_manifest(args.manifest).split(args.split) if r.annotation_path]
    if not records:
        raise ConfigError(f"{args.manifest}: no annotated {args.split} slide")
    strides = args.strides or [c.patches.patch_size, c.patches.patch_size // 2]
    rows = {s: [] for s in strides}
    for record in tqdm(records, desc="slides", unit="slide"):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            for stride in strides:
                rows[stride].append(slide_ceiling(
                    slide, record.annotation_path, size=c.refine.size, magnification=c.patches.magnification,
                    patch_size=c.patches.patch_size, stride=stride, tumour_threshold=c.patches.tumour_threshold,
                    annotation_downsample=c.patches.annotation_downsample))
    print(f"{args.manifest.name} {args.split} ({len(records)} slides), {c.patches.patch_size} px patches at "
          f"{c.patches.magnification:g}x, scored at {c.refine.size}x{c.refine.size}: perfect-classifier Dice")
    print(f"{'stride':>7} {'soft':>7} {'label':>7}")
    for stride in strides:
        soft = np.mean([r["soft"] for r in rows[stride]])
        label = np.mean([r["label"] for r in rows[stride]])
        print(f"{stride:>7} {soft:7.3f} {label:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
