#!/usr/bin/env python
"""Time a slide's segmentation with exported models (the paper's Table 3); what runs comes from their metadata.

    python export/benchmark.py --slide S --patch-model M --refine-model R --engine openvino \\
        --device CPU --repeats 10 --json [OUT.json] [--threads N] [--precision f32|bf16|f16] \\
        [--markdown OUT.md] [--peer fast] [--int8]
    python export/benchmark.py --slide S --model M.onnx|M.xml [--engine openvino|onnxruntime] \\
        [--stride N] [--keep N] [--blend centre|tent] --repeats 10 [--json [OUT.json]] [--markdown OUT.md]

H2G-Net (``--patch-model`` + ``--refine-model``, or ``--model P R`` by their metadata
roles): one warm-up, then ``--repeats`` runs of the whole pipeline; per stage (tissue
detection, patch reading, patch inference, stitching, refinement) and in total, mean and
sd in seconds; patches/s; in the same run the read-only and inference-only times and
``pipeline_efficiency`` = (read-only s + inference-only s) / pipeline s; peak resident
memory; engine, version, device, threads and precision; the ceiling of a perfectly
overlapped pipeline and the pipeline's fraction of it.  ``--peer fast`` also times FAST
(pyfast) on the same slide and models, or says how to install it.  ``--int8`` also times
the models' int8 versions (``export/convert.py --int8``) in the same run.

A segmentation model whose metadata names its views (``--model M``: DMMN, ...): the
same for its sliding-window segmentation (tissue detection, window reading of every
view, inference, stitching; windows/s; read-only, inference-only and pipeline
efficiency), with the views, stride and raster it ran at.

``--json`` alone prints the JSON on stdout.  Runs without TensorFlow.  Bad input (e.g.
GPU requested but absent): exit code 2, one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError
from h2g.export.deploy import add_pipeline_arguments, add_window_arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)

    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--model", type=Path, nargs="+", default=[], metavar="M",
                   help="exported model(s) (.onnx / .xml); what runs comes from their metadata")
    add_pipeline_arguments(p, models_required=False)
    add_window_arguments(p)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT.json",
                   help="write the results as JSON (stdout without a path)")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT.md", help="write a Table 3 style report")
    p.add_argument("--peer", choices=("fast",), default=None, help="also time FAST on the same slide")
    p.add_argument("--int8", action="store_true",
                   help="H2G-Net: also time the int8 models beside the given ones (<name>_int8.xml / .onnx, from "
                        "export/convert.py --int8) in the same run, with their speed-up")
    return p.parse_args(argv)


def run_h2g(args, backends) -> tuple[dict, str]:
    """H2G-Net's benchmark (and FAST's with ``--peer fast``): the result and its Markdown."""
    from h2g.export.benchmark import benchmark, benchmark_markdown
    from h2g.export.fast import fast_peer
    from h2g.io.slide import Slide

    with Slide(args.slide, mpp=args.mpp, reader=args.reader) as slide:
        result = benchmark(slide, *backends, repeats=args.repeats, size=args.size,
                           magnification=args.magnification, patch_size=args.patch_size,
                           heatmap_stride=args.heatmap_stride, batch_size=args.batch_size, readers=args.readers)
        power = slide.objective_power
        if args.int8:
            result["int8"] = benchmark(slide, *int8_backends(args), repeats=args.repeats, size=args.size,
                                       magnification=args.magnification, patch_size=args.patch_size,
                                       heatmap_stride=args.heatmap_stride, batch_size=args.batch_size, readers=args.readers)
    peer = None
    if args.peer == "fast":
        with tempfile.TemporaryDirectory() as work:
            peer = fast_peer(args.slide, args.patch_model, engine=args.engine, repeats=args.repeats,
                             work_dir=work, objective_power=power, magnification=args.magnification,
                             patch_size=args.patch_size)
        result["peer"] = peer
        if "skipped" in peer:
            print(f"peer FAST skipped: {peer['skipped']}", file=sys.stderr)
            peer = None
        elif args.precision is not None:
            print(f"note: FAST's OpenVINO runs at its default precision (bf16 on CPUs that have it); "
                  f"this run forced {args.precision}: compare with a run without --precision", file=sys.stderr)
    return result, benchmark_markdown(result, peer)


def int8_backends(args):
    """The patch and refinement backends of the ``_int8`` siblings of the given models."""
    from h2g.export.deploy import pipeline_backends
    from h2g.export.quantize import int8_path

    twins = argparse.Namespace(**vars(args))
    twins.patch_model, twins.refine_model = int8_path(args.patch_model), int8_path(args.refine_model)
    missing = [str(p) for p in (twins.patch_model, twins.refine_model) if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"--int8: {', '.join(missing)} not found; make them with export/convert.py --int8")
    return pipeline_backends(twins)


def run_windows(args, plan) -> tuple[dict, str]:
    """A sliding-window model's benchmark: the result and its Markdown."""
    from h2g.export.benchmark import benchmark_windows, windows_markdown
    from h2g.io.slide import Slide

    if args.peer:
        raise ConfigError("--peer fast times H2G-Net's models, not a sliding-window model")
    if args.int8:
        raise ConfigError("--int8 times H2G-Net's int8 models beside the given ones; benchmark a sliding-window "
                          "model's <name>_int8 file with --model instead")
    with Slide(args.slide, mpp=args.mpp, reader=args.reader) as slide:
        result = benchmark_windows(slide, plan.backends[0], plan.metadata, repeats=args.repeats,
                                   stride=args.stride, keep=args.keep, blend=args.blend,
                                   magnification=args.magnification, patch_size=args.patch_size,
                                   batch_size=args.batch_size, readers=args.readers)
    return result, windows_markdown(result)


def run_razn(args, plan) -> tuple[dict, str]:
    """RAZN's three networks (``--model POLICY COARSE FINE``): h2g.export.zoom's benchmark."""
    from h2g.export.zoom import benchmark_zoom, zoom_markdown
    from h2g.io.slide import Slide

    with Slide(args.slide, mpp=args.mpp, reader=args.reader) as slide:
        result = benchmark_zoom(slide, *plan.backends, plan.metadata, repeats=args.repeats,
                                batch_size=args.batch_size)
    return result, zoom_markdown(result)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.export.deploy import deployment_plan

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    plan = deployment_plan(args, args.model)
    if plan.kind == "h2g":
        result, markdown = run_h2g(args, plan.backends)
    elif plan.kind == "razn":
        result, markdown = run_razn(args, plan)
    else:
        result, markdown = run_windows(args, plan)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
