#!/usr/bin/env python
"""Time and memory of the whole-slide reads on a slide without a pyramid.

    python tools/bench_flat_slide.py [--side 100000] [--mpp 0.25] [--size 1024] [--reader tiles] [--work DIR] [--json]

Writes a synthetic single-level tiled TIFF of ``--side`` x ``--side`` px (deflate tiles of
512 px; glass with one block of flat tissue colour in its upper left quarter: a 100k x 100k
slide is about 40 MB on disk, written from pre-encoded tiles in seconds), then, in this
process, reads what every pipeline reads of the whole slide, each step timed:

- ``tissue``: the tissue mask at 1.25x (:func:`h2g.tiling.tissue.detect_tissue`);
- ``lowres``: H2G-Net's refinement inputs at ``--size`` (:func:`h2g.inference.lowres.refinement_inputs`);
- ``thumbnail``: the overlay's thumbnail (:func:`h2g.io.overlay.thumbnail`).

With a pyramid these read a small level; without one the full-resolution level is read
once, region by region, into an in-memory overview (:meth:`h2g.io.slide.Slide.read_level_shrunk`;
a progress bar on a terminal) from which all three are made.  ``--reader``: how the
slide is opened (``tiles``, deployment's default: decoded TIFF tiles; ``openslide``:
training's, about 6x slower here).  Prints the seconds per step, the peak resident memory of the process
(``VmHWM``), and checks that the tissue block is where it was written.  Exit code 1 when
it is not.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli

TISSUE_RGB = (200, 80, 150)
TILE = 512


def write_flat_tiff(path: Path, side: int, block: tuple[int, int, int, int], mpp: float = 0.25,
                    tile: int = TILE) -> Path:
    """A single-level tiled RGB TIFF of ``side`` x ``side`` px, white glass with the level-0
    rectangle ``block`` = (x, y, w, h) (multiples of ``tile``) in :data:`TISSUE_RGB`,
    written from two pre-encoded deflate tiles (glass, tissue), at ``mpp`` um/px."""
    import imagecodecs
    import tifffile

    x, y, w, h = block
    if any(v % tile for v in block):
        raise ValueError(f"the block {block} must be on the {tile} px tile grid")
    glass = imagecodecs.zlib_encode(np.full((tile, tile, 3), 255, np.uint8).tobytes(), level=9)
    tissue = imagecodecs.zlib_encode(np.broadcast_to(np.array(TISSUE_RGB, np.uint8), (tile, tile, 3)).tobytes(),
                                     level=9)
    tiles_across = -(-side // tile)

    def tiles():
        for row in range(tiles_across):
            for col in range(tiles_across):
                inside = x <= col * tile < x + w and y <= row * tile < y + h
                yield tissue if inside else glass

    ppcm = 10_000.0 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                  photometric="rgb", resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", metadata=None)
    return path


def peak_memory_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    from h2g.core.measure import peak_memory_mb as peak

    return peak()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--side", type=int, default=100_000, help="slide side in px (default 100000)")
    p.add_argument("--mpp", type=float, default=0.25, help="microns per pixel (default 0.25: 40x)")
    p.add_argument("--size", type=int, default=1024, help="refinement size of the low-resolution view (default 1024)")
    p.add_argument("--reader", choices=("tiles", "openslide"), default="tiles",
                   help="how the slide is read (default tiles, as deployment reads it)")
    p.add_argument("--work", type=Path, default=None, help="folder for the slide (default: a temporary one, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.side < 4 * TILE:
        p.error(f"--side must be at least {4 * TILE}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.inference.lowres import refinement_inputs
    from h2g.io.overlay import thumbnail
    from h2g.io.slide import Slide
    from h2g.tiling.tissue import detect_tissue

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_flat_"))
    work.mkdir(parents=True, exist_ok=True)
    quarter = (args.side // 4) // TILE * TILE
    block = (quarter // 2 // TILE * TILE, quarter // 2 // TILE * TILE, quarter, quarter)
    try:
        start = time.perf_counter()
        path = write_flat_tiff(work / f"flat_{args.side}.tiff", args.side, block, args.mpp)
        written = time.perf_counter() - start
        before = peak_memory_mb()
        steps, cpu = {}, {}

        def timed(name, run):
            t, c = time.perf_counter(), time.process_time()
            value = run()
            steps[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
            return value

        with Slide(path, reader=args.reader) as slide:
            tissue = timed("tissue", lambda: detect_tissue(slide))
            image, _ = timed("lowres", lambda: refinement_inputs(slide, None, size=args.size))
            thumb = timed("thumbnail", lambda: thumbnail(slide))
            levels = slide.level_count
        # the block's share of the slide, measured on the tissue mask and the low-res view
        expected = (block[2] * block[3]) / args.side ** 2
        found = {"tissue": float(tissue.mask.mean()),
                 "lowres": float((image.min(axis=-1) < 0.9).mean())}
        report = {"slide": str(path), "side": args.side, "levels": levels, "reader": args.reader, "file_mb": round(path.stat().st_size / 2**20, 1),
                  "write_s": round(written, 2), "seconds": {k: round(v, 2) for k, v in steps.items()},
                  "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                  "peak_memory_mb": round(peak_memory_mb(), 1), "peak_before_reads_mb": round(before, 1),
                  "tissue_share": {"written": round(expected, 4), **{k: round(v, 4) for k, v in found.items()}},
                  "thumbnail": list(thumb.shape)}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(abs(v - expected) < 0.01 for v in found.values())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        s, c = report["seconds"], report["cpu_seconds"]
        print(f"{args.side} x {args.side} px single-level TIFF ({report['file_mb']} MB, written in {written:.1f} s), "
              f"reader {args.reader}: "
              f"tissue {s['tissue']:.1f} s, low-res view at {args.size} {s['lowres']:.1f} s, thumbnail "
              f"{s['thumbnail']:.1f} s (CPU {c['tissue']:.1f} / {c['lowres']:.1f} / {c['thumbnail']:.1f} s); "
              f"peak memory {report['peak_memory_mb']:.0f} MB ({report['peak_before_reads_mb']:.0f} MB before the reads)")
        print(f"tissue block: {100 * expected:.2f} % of the slide written, found {100 * found['tissue']:.2f} % "
              f"(mask), {100 * found['lowres']:.2f} % (low-res view)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
