#!/usr/bin/env python
"""Segment breast-cancer tumour in a whole-slide image with exported H2G-Net models.

    python export/segment_slide.py SLIDE --patch-model M.onnx --refine-model R.onnx \\
        --engine openvino --device CPU --out DIR [--mpp X] [--precision f32|bf16|f16]

Tissue detection, patch reading in parallel with inference (bounded queue), stitching,
refinement; writes into DIR: ``heatmap.npy``, ``heatmap.png``, ``segmentation.png``,
``heatmap.tiff``, ``segmentation.tiff`` (pyramidal, overlaying the slide),
``tumour.geojson`` (the outline QuPath imports, level-0 pixels) and ``summary.json``.
Runs without TensorFlow (ONNX Runtime or OpenVINO only).  Models: ``.onnx`` for either
engine, ``.xml`` (OpenVINO IR) for openvino.  Bad input: exit code 2, one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2g.core.cli import run_cli
from h2g.export.deploy import add_pipeline_arguments, pipeline_backends


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    add_pipeline_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.export.deploy import segment, write_outputs
    from h2g.io.slide import Slide

    backends = pipeline_backends(args)
    with Slide(args.slide, mpp=args.mpp) as slide:
        seg = segment(slide, *backends, size=args.size, magnification=args.magnification,
                      patch_size=args.patch_size, batch_size=args.batch_size, readers=args.readers,
                      progress=not args.quiet)
        paths = write_outputs(seg, slide, args.out, extra={"patch_backend": backends[0].info(),
                                                           "refine_backend": backends[1].info()})
    t = seg.timings
    print(f"{args.slide}: {t['patches']} patches, tumour {100 * seg.mask.mean():.1f} % of the "
          f"{args.size}x{args.size} view, {t['total']:.2f} s ({backends[0].name} {backends[0].device} "
          f"{backends[0].precision}); outputs in {paths['summary'].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
