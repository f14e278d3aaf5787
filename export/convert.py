#!/usr/bin/env python
"""Convert trained Keras models to ONNX and OpenVINO IR, checking parity with Keras.

    python export/convert.py RUN_DIR_or_MODEL.keras ... [--out DIR] [--fp16] [--opset N]
                             [--slide SLIDE] [--mpp X]
                             [--int8 [--calibration-samples N] [--int8-tolerance 0.01]
                              [--int8-engines openvino onnxruntime] [--manifest M] [--seed S]]

Every ``.keras`` model found (patch classifiers, cluster model, refinement networks,
UNet-LR) becomes ``<name>.onnx`` (inputs ``image`` / ``heatmap``, dynamic batch) and
``<name>.xml/.bin`` (FP32; ``--fp16`` adds ``<name>_fp16.xml/.bin``), next to the model or
under ``--out``, with ``conversion_report.json``.  Parity is checked on patches and the
low-resolution image of ``--slide`` (default: the first slide of the embedded cohort):
ONNX Runtime and OpenVINO (f32) within 1e-4 of Keras, or exit code 2.

``--int8`` also writes ``<name>_int8.xml/.bin`` (NNCF, ``pip install "h2g[int8]"``) and
``<name>_int8.onnx`` (ONNX Runtime static QDQ) for every deployable model, calibrated on
patches of the run's training slides and guarded on its test slides: the int8 tumour
Dice (and per-class IoU) must be within 0.01 of the f32 models', or the int8 files are
removed and the exit code is 2 (see :mod:`h2g.export.quantize`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli, start_tensorflow
from h2g.core.errors import ConfigError
from h2g.core.outputs import check_output_dir


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
    q = p.add_argument_group("int8 post-training quantisation")
    q.add_argument("--int8", action="store_true", help="also quantise the deployable models to int8, with a guard")
    q.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                   help="patches / windows from the training slides (default 300)")
    q.add_argument("--int8-tolerance", type=float, default=None, metavar="D",
                   help="max |int8 - f32| of the test slides' mean tumour Dice and per-class IoU (default 0.01)")
    q.add_argument("--int8-engines", nargs="+", choices=("openvino", "onnxruntime"), default=None,
                   help="engines to quantise for (default both)")
    q.add_argument("--int8-overflow-fix", choices=("enable", "first_layer", "disable"), default=None,
                   help="NNCF's overflow fix (default enable: every layer's weights at 7 bits, so that the int8 IR "
                        "is right on CPUs without VNNI too; first_layer is NNCF's own default)")
    q.add_argument("--manifest", type=Path, default=None,
                   help="the run's manifest (default: the one its config.json names)")
    q.add_argument("--seed", type=int, default=None, help="calibration sample seed (default: the run's seed)")
    return p.parse_args(argv)


def check_outputs(args) -> None:
    """--out, or (without it) the folders the models' exports are written beside."""
    if args.out is not None:
        check_output_dir(args.out)
        return
    for path in args.paths:
        if path.exists():
            check_output_dir(path if path.is_dir() else path.parent, what="output folder of")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_outputs(args)
    start_tensorflow(args.verbose)  # after the arguments and outputs are checked: a wrong one fails at once
    from h2g.export.conversion import convert, default_parity_slide
    from h2g.export.quantize import Int8Options, summary_lines
    from h2g.io.slide import Slide

    int8_only = [f"--{k.replace('_', '-')}" for k in ("calibration_samples", "int8_tolerance", "int8_engines",
                                                      "int8_overflow_fix")
                 if getattr(args, k) is not None]
    if int8_only and not args.int8:
        raise ConfigError(f"{', '.join(int8_only)} apply only with --int8")
    int8 = None
    if args.int8:
        defaults = Int8Options()
        int8 = Int8Options(manifest=args.manifest, seed=args.seed,
                           samples=args.calibration_samples or defaults.samples,
                           tolerance=args.int8_tolerance if args.int8_tolerance is not None else defaults.tolerance,
                           engines=tuple(args.int8_engines or defaults.engines),
                           overflow_fix=args.int8_overflow_fix or defaults.overflow_fix)
    with Slide(args.slide or default_parity_slide(), mpp=args.mpp) as slide:
        report = convert(args.paths, slide, args.out, opset=args.opset, fp16=args.fp16,
                         tolerance=args.tolerance, progress=not args.quiet, int8=int8)
    for entry in json.loads(report.read_text())["models"]:
        p = entry["parity"]
        print(f"{entry['keras']} -> {entry['onnx']}, {entry['openvino']}: "
              f"onnxruntime {p['onnxruntime']}, openvino f32 {p['openvino_f32']}, "
              f"openvino default {p['openvino_default']}")
        if p["constant_output"]:
            print(f"warning: {entry['keras']} gives (almost) the same output for every parity input "
                  "(an untrained model?): parity proves little", file=sys.stderr)
    for line in summary_lines(json.loads(report.read_text()).get("int8", [])):
        print(line)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
