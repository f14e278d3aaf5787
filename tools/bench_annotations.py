#!/usr/bin/env python
"""Peak memory and time of reading labels from a CAMELYON-size slide's annotation.

    python tools/bench_annotations.py [--width 100000] [--height 200000] [--polygons 3000]
                                      [--views 1000] [--raster] [--seed 0] [--json]

Writes a synthetic QuPath GeoJSON for a slide of WIDTH x HEIGHT level-0 px at 0.25 um/px
(40x): POLYGONS irregular blobs (64-256 vertices, 0.1-1.5 mm across, one in ten with a
hole) of two classes, tumour and stroma, plus a few exclusions, and reads every label a
run needs from it, in a fresh process, as the stages read them (a stub slide: no pixels
are read):

- ``load``: parse, class table, validity, clipping, spatial index;
- ``patch grid``: class coverage of the paper's patch grid (256 px at 10x: 1024 level-0
  px a side, ~19k cells): the polygons' exact areas per patch;
- ``views``: VIEWS label views of 256 x 256 px at 20x (DMMN's target) at random centres;
- ``truth 1024``: H2G-Net's truth, tumour coverage on a 1024 x 1024 grid over the slide;
- ``label map /32``: the whole slide's label map at downsample 32.

It prints the seconds of each step and the process's peak resident memory (``ru_maxrss``)
after each.  ``--raster`` also writes the same labels as a tiled pyramidal TIFF mask at
downsample 4 (as CAMELYON16 ships masks; not timed) and runs the same reads from it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli

MPP = 0.25
CLASSES = "name,value,colour,aliases\ntumour,1,#c80000,Tumor\nstroma,2,#0064c8,\nignore,0,,\n"


class StubSlide:
    """Dimensions and scale of a 40x slide, without pixels."""

    def __init__(self, width: int, height: int):
        self.dimensions = (width, height)
        self.path = Path("stub.svs")
        self.mpp = MPP
        self.objective_power = 40.0

    def downsample_for(self, magnification: float) -> float:
        return self.objective_power / magnification


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--width", type=int, default=100_000)
    p.add_argument("--height", type=int, default=200_000)
    p.add_argument("--polygons", type=int, default=3000)
    p.add_argument("--views", type=int, default=1000)
    p.add_argument("--raster", action="store_true", help="also read the same labels from a tiled TIFF mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    if min(args.width, args.height) < 4096 or args.polygons < 1 or args.views < 0:
        p.error("--width/--height >= 4096, --polygons >= 1, --views >= 0")
    return args


def write_geojson(path: Path, width: int, height: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    features = []
    for k in range(n):
        vertices = int(rng.integers(64, 257))
        radius = rng.uniform(200, 3000)  # level-0 px: 0.1-1.5 mm across
        centre = rng.uniform([radius, radius], [width - radius, height - radius])
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radii = radius * (0.6 + 0.4 * rng.random(vertices))
        ring = np.c_[centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)].round(1).tolist()
        rings = [ring + [ring[0]]]
        if k % 10 == 0:
            hole = (centre + 0.3 * radius * np.c_[np.cos(angles[::4]), np.sin(angles[::4])]).round(1).tolist()
            rings.append(hole + [hole[0]])
        name = "Exclusion" if k % 97 == 0 else ("Tumor" if rng.random() < 0.5 else "stroma")
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"objectType": "annotation", "classification": {"name": name}}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def write_raster(path: Path, geojson: Path, table, width: int, height: int) -> None:
    """The polygons' labels as a tiled pyramidal mask at downsample 4 (pixel values =
    the class table's values, 0 unannotated), rendered tile row by tile row."""
    from h2g.io.annotation import load_annotation
    from h2g.io.pyramid import write_pyramid_tiles

    annotation = load_annotation(geojson, StubSlide(width, height), classes=table)
    values = np.array([e.values[0] for e in table.entries] + [0] * (256 - table.n_classes), np.uint8)
    values[255] = 0

    def render(x, y, w, h):
        return values[annotation.sample(x * 4, y * 4, 4, 4, w, h)]

    write_pyramid_tiles(path, (-(-width // 4), -(-height // 4)), render, mpp=MPP * 4, channels=1)


def measure(annotation_path: str, classes_path: str, width: int, height: int, views: int, seed: int, queue) -> None:
    """One fresh process: the reads of the module doc, seconds and peak RSS after each."""
    from h2g.io.annotation import load_annotation
    from h2g.io.classes import load_class_table
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import TissueMask

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    steps = [("imports", 0.0, peak_mib())]
    slide = StubSlide(width, height)
    table = load_class_table(classes_path)
    t = time.perf_counter()
    annotation = load_annotation(annotation_path, slide, downsample=4, classes=table)
    steps.append(("load", time.perf_counter() - t, peak_mib()))
    t = time.perf_counter()
    tissue = TissueMask(np.ones((-(-height // 32), -(-width // 32)), bool), 32.0)
    grid = build_patch_grid(slide, tissue, annotation, magnification=10, patch_size=256)
    steps.append(("patch grid", time.perf_counter() - t, peak_mib()))
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0], [width, height], size=(views, 2))
    labelled = 0
    for x, y in centres:
        labelled += int(np.count_nonzero(annotation.sample(x - 256, y - 256, 2, 2, 256, 256) != 255))
    steps.append(("views", time.perf_counter() - t, peak_mib()))
    t = time.perf_counter()
    truth = annotation.coverage(table.tumour_index, 1024, 1024) >= 0.5
    steps.append(("truth 1024", time.perf_counter() - t, peak_mib()))
    t = time.perf_counter()
    labels = annotation.source.label_map(32)
    steps.append(("label map /32", time.perf_counter() - t, peak_mib()))
    queue.put({"steps": steps, "patch_counts": grid.counts, "labelled_view_pixels": labelled,
               "truth_tumour": float(truth.mean()), "label_map_shape": list(labels.shape)})


def run_measure(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.io.classes import load_class_table

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_annotations_") as folder:
        folder = Path(folder)
        geojson, classes = folder / "slide.geojson", folder / "slide.classes.csv"
        classes.write_text(CLASSES)
        write_geojson(geojson, args.width, args.height, args.polygons, args.seed)
        results["geojson"] = run_measure(str(geojson), str(classes), args.width, args.height, args.views, args.seed)
        results["geojson"]["file_mib"] = geojson.stat().st_size / 2**20
        if args.raster:
            tiff = folder / "slide_mask.tiff"
            write_raster(tiff, geojson, load_class_table(classes), args.width, args.height)
            results["raster"] = run_measure(str(tiff), str(classes), args.width, args.height, args.views, args.seed)
            results["raster"]["file_mib"] = tiff.stat().st_size / 2**20
    settings = {"width": args.width, "height": args.height, "polygons": args.polygons, "views": args.views,
                "seed": args.seed}
    if args.json:
        print(json.dumps({"settings": settings, **results}))
        return 0
    print(f"synthetic slide {args.width} x {args.height} px (40x), {args.polygons} polygons, {args.views} views")
    for source, result in results.items():
        print(f"\n{source} ({result['file_mib']:.1f} MiB on disk)")
        for name, seconds, peak in result["steps"]:
            print(f"  {name:<14} {seconds:>7.2f} s   peak RSS {peak:>7.0f} MiB")
        peak = max(p for _, _, p in result["steps"])
        print(f"  peak resident memory {peak:.0f} MiB ({'under' if peak < 1024 else 'OVER'} 1 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
