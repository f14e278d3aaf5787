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

from h2g.cli import run_cli
from h2g.inference import DEVICES, PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    p.add_argument("--patch-model", type=Path, required=True, help="patch classifier (.onnx or .xml)")
    p.add_argument("--refine-model", type=Path, required=True, help="refinement network (.onnx or .xml)")
    p.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    p.add_argument("--device", choices=DEVICES, default="CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="OpenVINO inference precision (default: the engine's choice, bf16 on CPUs that have it)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel, for slides without it")
    p.add_argument("--magnification", type=float, default=10.0, help="patch magnification (default 10x)")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=1024, help="refinement resolution (default 1024)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--readers", type=int, default=2, help="patch reader threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.deploy import segment, write_outputs
    from h2g.inference import make_backend
    from h2g.wsi import Slide

    backends = [make_backend(path, engine=args.engine, device=args.device, precision=args.precision,
                             threads=args.threads) for path in (args.patch_model, args.refine_model)]
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
