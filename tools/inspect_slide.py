#!/usr/bin/env python
"""Inspect a whole-slide image: pyramid, scale, tissue and (with a mask) patch labels.

    python tools/inspect_slide.py SLIDE [--annotation FILE] [--classes CSV] [--mpp X] [--png OUT.png] [--json]
                                  [--model M... | --patch-size 256 --magnification 10 --heatmap-stride N]

``--annotation`` is anything a manifest accepts: a PNG / TIFF mask, a QuPath GeoJSON, an
ASAP or Aperio XML (h2g.io.annotation); ``--classes`` its class table (default binary).
``--json`` prints one JSON object: ``path``, ``format``, ``dimensions`` (level 0 [w, h]),
``level_count``, ``level_dimensions``, ``level_downsamples``, ``mpp``,
``objective_power``, ``tissue_fraction`` (of the 1.25x plane), ``tissue_patches`` (the
patches segmentation would run: ``--patch-size`` px at ``--magnification``, centred
``--heatmap-stride`` px apart, more than 25 % tissue; from the models' metadata with
``--model``), ``no_tissue`` (true when there is none: export/segment_slide.py then reports
"no tissue found" and writes empty outputs; the same rule,
:func:`h2g.inference.heatmap.heatmap_grid`) and, with ``--annotation``, ``patches`` =
{``tumour``, ``non_tumour``, ``discarded``, ``background``} (with a class table: one
count per class, ``discarded`` and ``background``) and ``annotation_warnings``.  Without ``--json`` the same
facts are printed as a readable summary.  ``--png`` writes the 1.25x thumbnail with the
tissue mask tinted and the kept patches outlined by label.  Bad input: exit code 2 and a
one-line message on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import H2GError
from h2g.io.annotation import load_annotation
from h2g.io.classes import colour_rgb, load_class_table
from h2g.io.slide import Slide
from h2g.tiling.grid import PatchGrid, build_patch_grid
from h2g.tiling.tissue import TissueMask, detect_tissue

TISSUE_TINT = (0, 160, 255)
LABEL_COLOURS = {1: (220, 0, 0), 0: (0, 170, 0), -1: (255, 140, 0)}  # tumour, non-tumour, unlabelled
MIN_PNG_SIDE = 1024  # small thumbnails are enlarged (nearest neighbour) to at least this


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(parser)
    parser.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    parser.add_argument("--annotation", type=Path,
                        help="annotation: PNG / TIFF mask, QuPath GeoJSON, ASAP or Aperio XML")
    parser.add_argument("--classes", type=Path, help="class table CSV of the annotation (default: binary tumour)")
    parser.add_argument("--annotation-downsample", type=float, default=4.0,
                        help="level-0 pixels per label-map pixel (default 4; a mask's own is found from its size)")
    parser.add_argument("--mpp", type=float, help="microns per level-0 pixel (overrides the metadata)")
    parser.add_argument("--png", type=Path, help="write the annotated thumbnail here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", type=Path, nargs="+", default=[],
                        help="exported models (.onnx / .xml): patch size, magnification and heatmap stride from "
                             "their metadata, as segment_slide.py takes them")
    parser.add_argument("--patch-size", type=int, default=None, help="patch size (default 256, or the model's)")
    parser.add_argument("--magnification", type=float, default=None,
                        help="patch magnification (default 10, or the model's)")
    parser.add_argument("--heatmap-stride", type=int, default=None,
                        help="px between patch centres (default: the patch size, or the model's)")
    return parser.parse_args(argv)


def pipeline_grid(args) -> dict:
    """Patch size, magnification and heatmap stride as segmentation would use them: the
    options, else the models' metadata, else H2G-Net's defaults (256 px at 10x,
    non-overlapping)."""
    from h2g.inference.metadata import model_metadata

    found = {"patch_size": None, "magnification": None, "heatmap_stride": None}
    for path in args.model:
        meta = model_metadata(path)
        if meta is None:
            raise H2GError(f"{path}: no h2g metadata in the model file; give --patch-size / --magnification instead")
        if meta.views and meta.role in ("patch_classifier", "segmentation", "policy", "coarse"):
            found["patch_size"], found["magnification"] = meta.views[0].size, meta.views[0].magnification
        if meta.extras.get("heatmap_stride") is not None:
            found["heatmap_stride"] = int(meta.extras["heatmap_stride"])
    given = {k: getattr(args, k) for k in found}
    out = {k: given[k] if given[k] is not None else found[k] for k in found}
    out["patch_size"] = int(out["patch_size"] or 256)
    out["magnification"] = float(out["magnification"] or 10.0)
    return out


def inspect(slide: Slide, tissue: TissueMask, grid: PatchGrid, annotated: bool, tissue_patches: int,
            patches: dict, warnings=()) -> dict:
    """The facts the tool reports about ``slide``."""
    report = {
        "path": str(slide.path),
        "format": slide.format,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": list(slide.level_downsamples),
        "mpp": slide.mpp,
        "objective_power": slide.objective_power,
        "tissue_fraction": tissue.fraction,
        "tissue_patches": int(tissue_patches),
        "no_tissue": tissue_patches == 0,
        "patch_grid": patches,
    }
    if annotated:
        report["patches"] = dict(grid.counts)
        report["annotation_warnings"] = list(warnings)
    return report


def overview(slide: Slide, tissue: TissueMask, grid: PatchGrid) -> Image.Image:
    """The tissue-plane thumbnail, tissue tinted, kept patches outlined by label."""
    image = slide.read_magnification(1.25).astype(np.float32)  # same size as the mask
    image[tissue.mask] = 0.6 * image[tissue.mask] + 0.4 * np.array(TISSUE_TINT, np.float32)
    thumb = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    zoom = max(1, math.ceil(MIN_PNG_SIDE / max(thumb.size)))
    thumb = thumb.resize((thumb.width * zoom, thumb.height * zoom), Image.NEAREST)
    scale = zoom / tissue.downsample
    draw = ImageDraw.Draw(thumb)
    colours = (LABEL_COLOURS if grid.classes.is_binary else
               {-1: LABEL_COLOURS[-1], **{k: tuple(colour_rgb(c)) for k, c in enumerate(grid.classes.colours)}})
    for (x, y), label in zip(grid.coords, grid.labels):
        box = (x * scale, y * scale, (x + grid.step) * scale - 1, (y + grid.step) * scale - 1)
        draw.rectangle(box, outline=colours[int(label)], width=max(1, zoom))
    return thumb


def summary(report: dict) -> str:
    """A readable multi-line version of ``report``."""
    w, h = report["dimensions"]
    levels = ", ".join(f"{d:g}" for d in report["level_downsamples"])
    lines = [
        f"slide:           {report['path']}",
        f"format:          {report['format']}",
        f"dimensions:      {w} x {h} px (level 0)",
        f"levels:          {report['level_count']} (downsamples {levels})",
        f"scale:           {report['mpp']:.4g} um/px, {report['objective_power']:g}x objective",
        f"tissue:          {100 * report['tissue_fraction']:.1f}% of the 1.25x plane",
        f"tissue patches:  {report['tissue_patches']} ({_grid_text(report['patch_grid'])}, > 25 % tissue)",
    ]
    if report["no_tissue"]:
        lines.append(f"no tissue:       no {_grid_text(report['patch_grid'])} patch is more than 25 % tissue: "
                     "segment_slide.py finds no tissue here and writes empty outputs")
    if "patches" in report:
        p = report["patches"]
        if "tumour" in p and "non_tumour" in p:
            lines.append(f"labelled:        {p['tumour']} tumour, {p['non_tumour']} non-tumour, "
                         f"{p['discarded']} discarded")
        else:
            counts = ", ".join(f"{n} {k}" for k, n in p.items() if k != "background")
            lines.append(f"labelled:        {counts}")
        lines += [f"warning:         {w}" for w in report.get("annotation_warnings", [])]
    return "\n".join(lines)


def _grid_text(patches: dict) -> str:
    stride = patches.get("heatmap_stride")
    centred = f", {stride} px apart" if stride and stride != patches["patch_size"] else ""
    return f"{patches['patch_size']} px at {patches['magnification']:g}x{centred}"


def main(argv=None) -> int:
    from h2g.inference.heatmap import heatmap_grid

    args = parse_args(argv)
    patches = pipeline_grid(args)
    with Slide(args.slide, mpp=args.mpp) as slide:
        tissue = detect_tissue(slide)
        classes = load_class_table(args.classes) if args.classes else None
        annotation = (load_annotation(args.annotation, slide, args.annotation_downsample, classes=classes)
                      if args.annotation else None)
        grid = build_patch_grid(slide, tissue, annotation, magnification=patches["magnification"],
                                patch_size=patches["patch_size"])
        cells, _ = heatmap_grid(slide, tissue, magnification=patches["magnification"],
                                patch_size=patches["patch_size"], stride=patches["heatmap_stride"])
        report = inspect(slide, tissue, grid, annotation is not None, len(cells.coords), patches,
                         warnings=annotation.warnings if annotation is not None else ())
        if args.png:
            try:
                overview(slide, tissue, grid).save(args.png)
            except (OSError, ValueError) as exc:
                raise H2GError(f"{args.png}: cannot write the PNG: {exc}") from None
    print(json.dumps(report) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
