#!/usr/bin/env python
"""Convert trained Keras models to ONNX and OpenVINO IR, checking parity with Keras.

    python export/convert.py RUN_DIR_or_MODEL.keras ... [--out DIR] [--fp16] [--opset N]
                             [--slide SLIDE] [--mpp X]

Every ``.keras`` model found (patch classifiers, cluster model, refinement networks,
UNet-LR) becomes ``<name>.onnx`` (inputs ``image`` / ``heatmap``, dynamic batch) and
``<name>.xml/.bin`` (FP32; ``--fp16`` adds ``<name>_fp16.xml/.bin``), next to the model or
under ``--out``, with ``conversion_report.json``.  Parity is checked on patches and the
low-resolution image of ``--slide`` (default: the first slide of the embedded cohort):
ONNX Runtime and OpenVINO (f32) within 1e-4 of Keras, or exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.export.conversion import DEFAULT_OPSET, TOLERANCE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    add_verbose_argument(p)
    p.add_argument("paths", nargs="+", type=Path, help="run folders and/or .keras files")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: next to each model)")
    p.add_argument("--fp16", action="store_true", help="also write FP16-compressed OpenVINO IR")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--slide", type=Path, default=None, help="slide for the parity check")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel of --slide, if it lacks it")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="max |diff| vs Keras (default 1e-4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.export.conversion import convert, default_parity_slide
    from h2g.io.slide import Slide

    with Slide(args.slide or default_parity_slide(), mpp=args.mpp) as slide:
        report = convert(args.paths, slide, args.out, opset=args.opset, fp16=args.fp16,
                         tolerance=args.tolerance, progress=not args.quiet)
    for entry in json.loads(report.read_text())["models"]:
        p = entry["parity"]
        print(f"{entry['keras']} -> {entry['onnx']}, {entry['openvino']}: "
              f"onnxruntime {p['onnxruntime']}, openvino f32 {p['openvino_f32']}, "
              f"openvino default {p['openvino_default']}")
        if p["constant_output"]:
            print(f"warning: {entry['keras']} gives (almost) the same output for every parity input "
                  "(an untrained model?): parity proves little", file=sys.stderr)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=True))
