#!/usr/bin/env python
"""Inspect an annotation against its slide: per class area and polygons, warnings, label map, overlay.

    python tools/inspect_annotation.py SLIDE ANNOTATION [--classes CSV] [--json]
        [--downsample D --labels OUT.png] [--overlay OUT.png] [--mpp X]

ANNOTATION is anything a manifest's ``annotation_path`` accepts: a QuPath GeoJSON, an
ASAP or Aperio ImageScope XML, or a PNG / TIFF mask (h2g.io.annotation).  ``--classes``
is the manifest's class table (``<manifest>.classes.csv``; default: the binary
tumour / non-tumour table).  Prints, per class, the area in mm^2 (of the geometry, with
the slide's mpp; a mask's labelled pixels) and the number of polygons, then the warnings
(skipped, repaired or clipped shapes; names read as non-tumour).  ``--json`` prints one
object: ``{"classes": [{"name", "area_mm2", "polygons"}, ...], "warnings": [...],
"format", "outside", "slide", "annotation", "dimensions", "mpp", "empty"}``.
``--labels`` writes the label map at the slide's size / ``--downsample`` (class index
per pixel, 255 where unannotated) as a PNG; ``--overlay`` a thumbnail of the slide with
each class's outline in its colour (binary annotations: the tumour's).  Bad input: exit code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    p.add_argument("annotation", type=Path, help="GeoJSON, ASAP / Aperio XML, or PNG / TIFF mask")
    p.add_argument("--classes", type=Path, help="class table CSV (default: binary tumour / non-tumour)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--downsample", type=float, default=None, help="level-0 px per label-map pixel (for --labels)")
    p.add_argument("--labels", type=Path, help="write the label map PNG here (needs --downsample)")
    p.add_argument("--overlay", type=Path, help="write the outline thumbnail PNG here")
    p.add_argument("--mpp", type=float, help="microns per level-0 pixel (overrides the slide's metadata)")
    args = p.parse_args(argv)
    if args.labels and args.downsample is None:
        p.error("--labels needs --downsample D")
    if args.downsample is not None and not args.downsample > 0:
        p.error(f"--downsample must be positive, got {args.downsample:g}")
    return args


def _check_output(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{flag} {path}: write a .png")
    if path.is_dir() or not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: not a file in an existing folder")


def summary(report: dict) -> str:
    lines = [f"slide:       {report['slide']} ({report['dimensions'][0]}x{report['dimensions'][1]} px, "
             f"{report['mpp']:.4g} um/px)",
             f"annotation:  {report['annotation']} ({report['format']}; outside the shapes: {report['outside']})"]
    width = max(len(c["name"]) for c in report["classes"])
    for c in report["classes"]:
        polygons = "" if c["polygons"] is None else f"  {c['polygons']:>6} polygon(s)"
        lines.append(f"  {c['name']:<{width}}  {c['area_mm2']:>10.4f} mm^2{polygons}")
    for name, n in report.get("read_as_non_tumour", {}).items():
        lines.append(f"note: {name!r} ({n} polygon(s)) read as non-tumour")
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    if report["empty"]:
        lines.append("warning: no annotated polygon (an unannotated slide)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.core.atomic import replace_atomically
    from h2g.io.annotation import load_annotation
    from h2g.io.annotation_report import OVERLAY_SIDE, annotation_report, outline_overlay
    from h2g.io.classes import load_class_table
    from h2g.io.overlay import thumbnail
    from h2g.io.slide import Slide
    from PIL import Image

    _check_output(args.labels, "--labels")
    _check_output(args.overlay, "--overlay")
    classes = load_class_table(args.classes) if args.classes else None
    with Slide(args.slide, mpp=args.mpp) as slide:
        annotation = load_annotation(args.annotation, slide, downsample=args.downsample or 4.0, classes=classes)
        report = annotation_report(annotation, slide)
        if args.labels:
            labels = annotation.labels
            replace_atomically(args.labels, lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))
            report["labels"] = {"path": str(args.labels), "shape": list(labels.shape), "downsample": args.downsample}
        if args.overlay:
            thumb = thumbnail(slide)
            if max(thumb.shape[:2]) > OVERLAY_SIDE:
                scale = OVERLAY_SIDE / max(thumb.shape[:2])
                size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
                thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.BOX))
            width, height = slide.dimensions
            step_x, step_y = width / thumb.shape[1], height / thumb.shape[0]
            grid = annotation.sample(0, 0, step_x, step_y, thumb.shape[1], thumb.shape[0])
            outside = annotation.source.outside  # binary: non-tumour is everything outside the shapes
            image = outline_overlay(thumb, grid, annotation.classes.colours, skip=(outside,))
            replace_atomically(args.overlay, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
            report["overlay"] = str(args.overlay)
    print(json.dumps(report) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
