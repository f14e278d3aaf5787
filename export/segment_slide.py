#!/usr/bin/env python
"""Segment a whole-slide image with exported models; what runs comes from their metadata.

    python export/segment_slide.py MODEL... --slide SLIDE --out DIR [--engine openvino]
    python export/segment_slide.py SLIDE --patch-model M.onnx --refine-model R.onnx --out DIR

The models' embedded metadata (written by export/convert.py) says what they are:

- an H2G-Net patch classifier + refinement network (or ``--patch-model`` /
  ``--refine-model``): tissue detection, patch reading in parallel with inference,
  stitching, refinement; writes ``heatmap.npy``, ``heatmap.png``, ``segmentation.png``,
  ``heatmap.tiff``, ``segmentation.tiff`` (pyramidal, overlaying the slide),
  ``tumour.geojson`` (the outline QuPath imports, level-0 pixels) and ``summary.json``;
- one segmentation model with views (DMMN, ...): sliding window over the tissue, each
  window's views read around its centre; writes ``probabilities.npy``, ``labels.tiff`` /
  ``labels.png`` (label image), ``probability_<class>.tiff``, ``overlay.png``,
  ``classes.geojson`` (one QuPath annotation per class) and ``summary.json``;
- RAZN's policy + coarse + fine networks: the conditional zoom per region (the same
  outputs, and the regions zoomed in ``summary.json``).

Magnification and patch size come from the metadata (``--magnification`` /
``--patch-size`` override them, with a warning when they disagree).  Runs without
TensorFlow (ONNX Runtime or OpenVINO only).  Models: ``.onnx`` for either engine,
``.xml`` (OpenVINO IR) for openvino.  Bad input: exit code 2, one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.export.deploy import add_pipeline_arguments, add_window_arguments

MODEL_SUFFIXES = (".onnx", ".xml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    add_verbose_argument(p)
    p.add_argument("inputs", nargs="*", type=Path,
                   help="exported models (.onnx / .xml); in the older form, the slide")
    p.add_argument("--slide", type=Path, default=None, help="whole-slide image (any format OpenSlide reads)")
    add_pipeline_arguments(p, models_required=False)
    add_window_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--keep-ink", action="store_true",
                   help="sliding-window models: keep green / blue / black pixels in the tissue mask "
                        "(by default they are dropped as pen ink; use this for images that are not H&E)")
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
    from h2g.export.deploy import (
        deployment_plan,
        segment,
        segment_windows,
        write_outputs,
        write_raster_outputs,
    )
    from h2g.io.slide import Slide

    plan = deployment_plan(args, args.models)
    backends = plan.backends
    with Slide(args.slide, mpp=args.mpp, reader=args.reader) as slide:
        if plan.kind == "h2g":
            seg = segment(slide, *backends, size=args.size, magnification=args.magnification,
                          patch_size=args.patch_size, heatmap_stride=args.heatmap_stride,
                          batch_size=args.batch_size, readers=args.readers, progress=not args.quiet)
            paths = write_outputs(seg, slide, args.out, extra={"patch_backend": backends[0].info(),
                                                               "refine_backend": backends[1].info()})
            t = seg.timings
            print(f"{args.slide}: {t['patches']} patches, tumour {100 * seg.mask.mean():.1f} % of the "
                  f"{args.size}x{args.size} view, {t['total']:.2f} s ({backends[0].name} {backends[0].device} "
                  f"{backends[0].precision}); outputs in {paths['summary'].parent}")
            return 0
        if plan.kind == "razn":  # policy + coarse + fine: the conditional zoom
            from h2g.export.zoom import segment_zoom

            seg = segment_zoom(slide, *backends, plan.metadata, batch_size=args.batch_size, progress=not args.quiet)
            extra = {"backends": {r: b.info() for r, b in zip(("policy", "coarse", "fine"), backends)},
                     "zoom": {k: seg.timings[k] for k in ("regions", "zoomed", "zoom_fraction")}}
        else:
            from h2g.tiling.tissue import detect_tissue

            tissue = detect_tissue(slide, drop_ink=False) if args.keep_ink else None
            seg = segment_windows(slide, backends[0], plan.metadata, stride=args.stride, keep=args.keep,
                                  blend=args.blend, magnification=args.magnification, patch_size=args.patch_size,
                                  batch_size=args.batch_size, readers=args.readers, tissue=tissue,
                                  progress=not args.quiet)
            extra = {"backend": backends[0].info()}
        paths = write_raster_outputs(seg, slide, args.out, extra=extra)
    r, t = seg.raster, seg.timings
    print(f"{args.slide}: {t['windows']} windows, raster {r.shape[1]}x{r.shape[0]} at downsample "
          f"{r.downsample:g}, {t['total']:.2f} s ({backends[0].name} {backends[0].device} "
          f"{backends[0].precision}); outputs in {paths['summary'].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
