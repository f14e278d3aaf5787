#!/usr/bin/env python
"""Write a FAST / FastPathology text pipeline (.fpl) for exported H2G-Net models.

    python export/fast_pipeline.py --patch-model M.onnx --refine-model R.onnx --out h2g.fpl
                                   [--engine openvino|onnxruntime|tensorrt]

The pipeline uses the paper's parameters: tissue segmentation (colour thresholding), 256 x
256 patches at 10x with more than 25 % tissue, the patch classifier, the stitched tumour
heatmap, and the refinement network on the heatmap plus the low-resolution image.  Add it
to FastPathology, which gives it the slide (pipeline input ``WSI``) and shows its outputs
``heatmap`` and ``segmentation``; in Python (pyfast):
``fast.Pipeline("h2g.fpl").parse(inputData={"WSI": pyramid})``.  FAST's OpenVINO engine
(the default) feeds one patch at a time and cannot compile models with a dynamic batch
dimension, so for it batch-1 OpenVINO copies of both models (``<name>_batch1.xml/.bin``)
are written beside ``--out`` and the pipeline names those.  Bad input: exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.export.fast import FAST_ENGINES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    add_verbose_argument(p)
    p.add_argument("--patch-model", type=Path, required=True, help="patch classifier (.onnx or .xml)")
    p.add_argument("--refine-model", type=Path, required=True, help="refinement network (.onnx or .xml)")
    p.add_argument("--out", type=Path, default=Path("h2g_net.fpl"), help="pipeline file to write")
    p.add_argument("--engine", choices=sorted(FAST_ENGINES), default="openvino", help="FAST inference engine")
    p.add_argument("--magnification", type=float, default=10.0)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--tissue-threshold", type=float, default=0.25, help="minimum tissue fraction of a patch")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.export.fast import write_fast_pipeline

    path = write_fast_pipeline(args.out, args.patch_model, args.refine_model, engine=args.engine,
                               magnification=args.magnification, patch_size=args.patch_size,
                               tissue_threshold=args.tissue_threshold)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
