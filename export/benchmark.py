#!/usr/bin/env python
"""Time a slide's segmentation with exported models (the paper's Table 3); what runs comes from their metadata.

    python export/benchmark.py --slide S --patch-model M --refine-model R --engine openvino \\
        --device CPU --repeats 10 --json [OUT.json] [--threads N] [--precision f32|bf16|f16] \\
        [--markdown OUT.md] [--peer fast] [--int8] [--quiet]
    python export/benchmark.py --slide S --model M... [--engine openvino|onnxruntime] [--int8] \\
        [--stride N] [--keep N] [--blend centre|tent] --repeats 10 [--json [OUT.json]] [--markdown OUT.md]

Any system's models (``--model M...``, what runs comes from their metadata; H2G-Net's also
as ``--patch-model`` + ``--refine-model``): one warm-up, then ``--repeats`` runs of the
system's segmenter; per stage (H2G-Net: tissue detection, patch reading, patch inference,
stitching, refinement; a sliding window: tissue, window reading, inference, stitching;
RAZN: reading, policy, coarse, fine, stitching) and in total, mean and sd in seconds;
items/s; in the same run the read-only and inference-only times and
``pipeline_efficiency`` = (read-only s + inference-only s) / pipeline s with the ceiling
of a perfectly overlapped pipeline; peak resident memory; engine, version, device,
threads and precision.  ``--int8`` also times the models' int8 versions
(``export/convert.py --int8``: ``<name>_int8.xml`` / ``.onnx``) in the same run, with
the speed-up.  ``--peer fast`` also times FAST (pyfast) on H2G-Net's models, or says how
to install it.

``--json`` alone prints the JSON on stdout.  Runs without TensorFlow.  Bad input (e.g.
GPU requested but absent, a slide without tissue): exit code 2, one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError
from h2g.core.outputs import check_output_file

PEERS = ("fast",)


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.export.deploy import add_deploy_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--model", type=Path, nargs="+", default=[], metavar="M",
                   help="exported model(s) (.onnx / .xml); what runs comes from their metadata")
    add_deploy_arguments(p)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quiet", action="store_true",
                   help="no progress: otherwise the warm-up's time and how long the rest will take, then "
                        "each timed pass with a progress bar, on stderr")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT.json",
                   help="write the results as JSON (stdout without a path)")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT.md", help="write a Table 3 style report")
    p.add_argument("--peer", choices=PEERS, default=None, help="also time FAST on the same slide (H2G-Net)")
    p.add_argument("--int8", action="store_true",
                   help="also time the int8 models beside the given ones (<name>_int8.xml / .onnx, from "
                        "export/convert.py --int8) in the same run, with their speed-up")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def int8_twins(plan):
    """The deployment of the ``_int8`` siblings of ``plan``'s models."""
    from h2g.export.quantize import int8_path

    if isinstance(plan.models, dict):
        twins = {role: int8_path(p) for role, p in plan.models.items()}
        files = list(twins.values())
    else:
        twins = tuple(int8_path(p) for p in plan.models)
        files = list(twins)
    missing = [str(p) for p in files if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"--int8: {', '.join(missing)} not found; make them with export/convert.py --int8")
    return plan.with_models(twins)


def fast_peer_result(args, segmenter, slide_power: float) -> dict:
    """FAST's timing of the patch classifier on the same slide (``{"skipped": why}``, with
    a note on stderr, when FAST cannot run)."""
    from h2g.export.fast import fast_peer

    patch = segmenter.backends.get("patch_classifier")
    if patch is None:
        raise ConfigError("--peer fast times H2G-Net's patch classifier; these models have none")
    with tempfile.TemporaryDirectory() as work:
        peer = fast_peer(args.slide, patch.source, engine=args.engine, repeats=args.repeats, work_dir=work,
                         objective_power=slide_power, magnification=segmenter.magnification,
                         patch_size=segmenter.patch_size)
    if "skipped" in peer:
        print(f"peer FAST skipped: {peer['skipped']}", file=sys.stderr)
        return peer
    if args.precision is not None:
        print(f"note: FAST's OpenVINO runs at its default precision (bf16 on CPUs that have it); "
              f"this run forced {args.precision}: compare with a run without --precision", file=sys.stderr)
    return peer


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:  # before the models load
        check_output_file(args.markdown, "--markdown")
    if args.json not in (None, "-"):
        check_output_file(args.json, "--json")
    from h2g.export.benchmark import benchmark, benchmark_markdown
    from h2g.export.deploy import deployment

    plan = deployment(args, args.model)
    segmenter = plan.segmenter()
    show = dict(progress=not args.quiet, say=None if args.quiet else (lambda line: print(line, file=sys.stderr)))
    with plan.slides.open(args.slide) as slide:
        result = benchmark(segmenter, slide, repeats=args.repeats, **show)
        if args.int8:
            result["int8"] = benchmark(int8_twins(plan).segmenter(), slide, repeats=args.repeats, **show)
        power = slide.objective_power
    peer = None
    if args.peer == "fast":
        result["peer"] = fast_peer_result(args, segmenter, power)
        peer = None if "skipped" in result["peer"] else result["peer"]
    markdown = benchmark_markdown(result, segmenter.stage_labels, segmenter.headline, peer)
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
