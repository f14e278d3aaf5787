#!/usr/bin/env python
"""Make a manifest for a folder of slides and their annotations (your own cohort).

    python tools/make_manifest.py SLIDES_DIR [--annotations DIR] [--classes CSV] [--split 70/15/15]
        [--seed S] [--grades CSV] [--mpp X] --out MANIFEST.csv

Pairs each slide (any format OpenSlide reads) with the annotation file of the same stem
in ``--annotations`` (default: SLIDES_DIR): QuPath GeoJSON, ASAP / Aperio XML or a PNG /
TIFF mask, named ``<stem>.geojson``, ``<stem>_mask.tiff``, ``<stem>.annotations.json``, ...
Lists every slide without an annotation and every annotation without a slide (they are
left out), checks each pair as ``tools/inspect_slide.py`` / ``tools/inspect_annotation.py``
would (the slide opens and has a scale, the annotation reads with the class table, a test
slide's annotation is not empty), assigns train / val / test by ``--split`` fractions
shuffled by ``--seed`` (stratified by grade with ``--grades``, a CSV of slide_id,grade),
and writes MANIFEST.csv (paths relative to its folder) plus, with ``--classes``, its class
table beside it (``<stem>.classes.csv``): what ``experiments/run.py --manifest`` reads as
it is.  ``--mpp`` is the microns per pixel of slides whose metadata has none (a fallback:
it is written in their ``mpp`` column only).  Any bad file: exit code 2, every problem
listed, nothing written.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("slides", type=Path, metavar="SLIDES_DIR", help="folder of slides")
    p.add_argument("--annotations", type=Path, default=None, help="folder of annotations (default: SLIDES_DIR)")
    p.add_argument("--classes", type=Path, default=None,
                   help="class table CSV (name,value,colour[,aliases]); default: binary tumour / non-tumour")
    p.add_argument("--split", default="70/15/15", help="train/val/test fractions (default 70/15/15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--grades", type=Path, default=None, help="CSV with slide_id,grade (1-3) columns")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel of slides whose metadata lacks it")
    p.add_argument("--out", type=Path, required=True, help="the manifest CSV to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.io.manifest_builder import build_manifest

    report = build_manifest(args.slides, args.out, annotations_dir=args.annotations, classes=args.classes,
                            split=args.split, seed=args.seed, grades=args.grades, mpp=args.mpp)
    pairing = report.pairing
    for slide in pairing.slides_without:
        print(f"slide without an annotation (left out): {slide}")
    for annotation in pairing.annotations_without:
        print(f"annotation without a slide (left out): {annotation}")
    for file, warning in report.warnings:
        print(f"warning: {file}: {warning}")
    if report.fallback_mpp:
        print(f"--mpp {args.mpp:g} used for {len(report.fallback_mpp)} slide(s) without a scale: "
              f"{', '.join(report.fallback_mpp)}")
    counts = Counter(report.splits.values())
    print(f"wrote {report.manifest}: {len(pairing.pairs)} slides (train {counts['train']}, val {counts['val']}, "
          f"test {counts['test']})")
    if args.grades is None:
        print("no grades: the sampler's default stages balance on grade, so train with "
              "--set sampler.stages=slide,class,patch (or give --grades)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
