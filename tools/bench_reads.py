#!/usr/bin/env python
"""Patch reading through OpenSlide against reading from decoded tiles (``--reader tiles``),
on one slide's tissue patch grid, in one run: ms per patch of each, their ratio, and the
pixel differences between the two.

    python tools/bench_reads.py --slide S [--magnification 10] [--patch-size 256]
                                [--patches 1000] [--rounds 2] [--json]

Each round reads the same patches with a fresh handle of each reader (tiles first in odd
rounds, OpenSlide first in even ones, so neither always gets a warm page cache); the
figures are the medians over rounds.  One thread: the per-patch cost, not the pool's.
At a magnification with its own pyramid level the pixels are OpenSlide's exactly; at one
2, 4 or 8 times coarser than a level, JPEG tiles are decoded at reduced scale and the
differences are printed (max and mean absolute, 0-255).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--magnification", type=float, default=10.0)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--patches", type=int, default=1000, help="patches of the tissue grid (evenly spaced)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p.parse_args(argv)


def _time(path, mpp, reader, coords, size, magnification):
    from h2g.io.slide import Slide

    with Slide(path, mpp=mpp, reader=reader) as slide:
        served = slide._tiles is not None
        t0 = time.perf_counter()
        patches = [slide.read_region(tuple(c), (size, size), magnification) for c in coords]
        return time.perf_counter() - t0, patches, served


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.core.errors import ConfigError
    from h2g.io.slide import Slide
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import detect_tissue

    with Slide(args.slide, mpp=args.mpp) as slide:
        grid = build_patch_grid(slide, tissue=detect_tissue(slide), magnification=args.magnification,
                                patch_size=args.patch_size)
        levels = [round(d, 3) for d in slide.level_downsamples]
        downsample = slide.downsample_for(args.magnification)
    if not len(grid.coords):
        raise ConfigError(f"{args.slide}: no tissue patches at {args.magnification:g}x")
    picks = np.unique(np.linspace(0, len(grid.coords) - 1, min(args.patches, len(grid.coords))).round().astype(int))
    coords = grid.coords[picks]
    times = {"openslide": [], "tiles": []}
    served = False
    for k in range(args.rounds):
        order = ("tiles", "openslide") if k % 2 == 0 else ("openslide", "tiles")
        got = {}
        for reader in order:
            seconds, got[reader], tiled = _time(args.slide, args.mpp, reader, coords, args.patch_size,
                                                args.magnification)
            times[reader].append(seconds)
            served = served or (reader == "tiles" and tiled)
    diffs = np.concatenate([np.abs(a.astype(np.int16) - b).ravel() for a, b in zip(got["openslide"], got["tiles"])])
    ms = {r: 1e3 * float(np.median(v)) / len(coords) for r, v in times.items()}
    result = {
        "slide": str(args.slide), "magnification": args.magnification, "patch_size": args.patch_size,
        "downsample": downsample, "level_downsamples": levels, "patches": len(coords), "rounds": args.rounds,
        "tiles_served": served, "ms_per_patch": ms, "ratio_openslide_over_tiles": ms["openslide"] / ms["tiles"],
        "pixel_diff_max": int(diffs.max()), "pixel_diff_mean": float(diffs.mean()),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.slide}: {len(coords)} patches of {args.patch_size} px at {args.magnification:g}x "
              f"(downsample {downsample:g}; levels {levels}), median of {args.rounds} rounds, one thread")
        print(f"  OpenSlide {ms['openslide']:.3f} ms/patch, tiles {ms['tiles']:.3f} ms/patch: "
              f"tiles {result['ratio_openslide_over_tiles']:.2f}x faster"
              + ("" if served else " (tiles could not serve this slide: both read through OpenSlide)"))
        print(f"  pixel |OpenSlide - tiles|: max {result['pixel_diff_max']}, mean {result['pixel_diff_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
