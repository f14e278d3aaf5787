#!/usr/bin/env python
"""Segment a whole-slide image with exported models; what runs comes from their metadata.

    python export/segment_slide.py MODEL... --slide SLIDE --out DIR [--engine openvino]
    python export/segment_slide.py SLIDE --patch-model M.onnx --refine-model R.onnx --out DIR

The models' embedded metadata (written by export/convert.py) names their system, and the
system's segmenter runs them (:func:`h2g.systems.registry.load_segmenter`):

- an H2G-Net patch classifier + refinement network (or ``--patch-model`` /
  ``--refine-model``): tissue detection, patch reading in parallel with inference,
  stitching, refinement; writes ``heatmap.npy``, ``heatmap.png``, ``segmentation.png``,
  ``heatmap.tiff``, ``segmentation.tiff`` (pyramidal, overlaying the slide),
  ``tumour.geojson`` (the outline QuPath imports, level-0 pixels) and ``summary.json``;
- one segmentation model with views (DMMN, m-UNet, a RAZN baseline): sliding window over
  the tissue, each window's views read around its centre; writes ``probabilities.npy``,
  ``labels.tiff`` / ``labels.png`` (label image), ``probability_<class>.tiff``,
  ``overlay.png``, ``classes.geojson`` (one QuPath annotation per class) and
  ``summary.json``;
- RAZN's policy + coarse + fine networks: the conditional zoom per region (the same
  outputs, and the regions zoomed in ``summary.json``).

GeoJSON coordinates are level-0 pixels; ``--geojson-origin bounds`` writes them in
QuPath's frame cropped to the slide's OpenSlide bounds (MRXS), recorded in each feature's
properties.  Magnification and patch size come from the metadata (``--magnification`` /
``--patch-size`` with another value need ``--force``).  ``--mpp`` is used only for a slide
whose file states no scale; ``--force-mpp`` overrides the file's.  Runs without TensorFlow
(ONNX Runtime or OpenVINO only).  Models: ``.onnx`` for either engine, ``.xml`` (OpenVINO
IR) for openvino.  Bad input: exit code 2, one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.outputs import check_output_dir

MODEL_SUFFIXES = (".onnx", ".xml")


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.export.deploy import add_deploy_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("inputs", nargs="*", type=Path,
                   help="exported models (.onnx / .xml); in the older form, the slide")
    p.add_argument("--slide", type=Path, default=None, help="whole-slide image (any format OpenSlide reads)")
    add_deploy_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    models = [x for x in args.inputs if x.suffix.lower() in MODEL_SUFFIXES]
    others = [x for x in args.inputs if x.suffix.lower() not in MODEL_SUFFIXES]
    if args.slide is None and len(others) == 1:
        args.slide = others.pop()
    if others:
        p.error(f"not model files (.onnx, .xml): {' '.join(map(str, others))}")
    if args.slide is None:
        p.error("give the slide with --slide")
    args.models = models
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out)  # before the models load
    from h2g.export.deploy import deployment

    plan = deployment(args, args.models)
    segmenter = plan.segmenter()
    with plan.slides.open(args.slide) as slide:
        seg = segmenter.segment(slide, progress=not args.quiet)
        paths = segmenter.write(seg, slide, args.out)
    print(f"{args.slide}: {segmenter.describe(seg)}; outputs in {paths['summary'].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
