#!/usr/bin/env python
"""Patch reading through OpenSlide against reading from decoded tiles (``--reader tiles``, or
``reduced`` for reduced-scale JPEG decoding at a magnification without its own level),
on one slide's tissue patch grid, in one run: ms per patch of each, their ratio, and the
pixel differences between the two.

    python tools/bench_reads.py --slide S [--magnification 10] [--patch-size 256]
                                [--patches 1000] [--rounds 2] [--reader tiles|reduced] [--json]
    python tools/bench_reads.py --slide S --tissue [--rounds 3] [--json]

``--tissue`` times tissue detection instead (h2g.tiling.tissue.detect_tissue at 1.25x, as
the deployment pipeline runs it first): through OpenSlide's band reader (the former path,
still training's ``reader="openslide"``) against the level decoded from its tiles
(``reader="tiles"``, deployment's default) and decoded at reduced scale (``reader=
"reduced"``, opt-in), in turn, median of ``--rounds``; the level read and the
thresholding / closing separately, the process's CPU seconds (steadier than wall time on
a shared machine), the ratios, and the mask pixels that differ from OpenSlide's (tiles: 0,
the same mask; reduced: a few, its pixels are not block means).

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
    p.add_argument("--reader", choices=("tiles", "reduced"), default="tiles", help="the reader set against OpenSlide")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tissue", action="store_true",
                   help="time tissue detection (1.25x level read + thresholding) through OpenSlide, through tiles "
                        "and through tiles decoded at reduced scale (--reader reduced)")
    return p.parse_args(argv)


def tissue_round(path, mpp, reader) -> tuple[float, float, float, np.ndarray]:
    """(seconds reading the 1.25x plane, seconds of the whole detection, its CPU seconds
    over every thread, mask) with a fresh
    handle of ``reader``; detect_tissue's own steps, the read timed on its own."""
    from h2g.io.slide import Slide
    from h2g.tiling import tissue

    with Slide(path, mpp=mpp, reader=reader) as slide:
        reads = []
        real = slide.read_magnification

        def timed_read(magnification):
            t = time.perf_counter()
            try:
                return real(magnification)
            finally:
                reads.append(time.perf_counter() - t)

        slide.read_magnification = timed_read
        t0, c0 = time.perf_counter(), time.process_time()
        mask = tissue.detect_tissue(slide).mask
        return reads[0], time.perf_counter() - t0, time.process_time() - c0, mask


def bench_tissue(args) -> int:
    from h2g.core.errors import ConfigError
    from h2g.io.slide import Slide

    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    with Slide(args.slide, mpp=args.mpp, reader="tiles") as slide:
        d = slide.downsample_for(1.25)
        level = slide.best_level_for(d)
        served = slide._tiles is not None and slide._tiles.level(level) is not None
        size = slide.level_dimensions[level]
    order = ("tiles", "openslide", "reduced")
    times = {r: [] for r in order}
    masks = {}
    for k in range(args.rounds):
        for reader in order[k % 3:] + order[:k % 3]:  # each reader first in turn: none always gets a warm cache
            read_s, total_s, cpu_s, masks[reader] = tissue_round(args.slide, args.mpp, reader)
            times[reader].append((read_s, total_s, cpu_s))
    med = {r: tuple(float(np.median([t[k] for t in v])) for k in range(3)) for r, v in times.items()}
    differing = int((masks["openslide"] != masks["tiles"]).sum())
    reduced_differing = int((masks["openslide"] != masks["reduced"]).sum())
    result = {"slide": str(args.slide), "level": level, "level_size": list(size), "shrink": d / slide.level_downsamples[level],
              "mask_shape": list(masks["tiles"].shape), "rounds": args.rounds, "tiles_served": served,
              "seconds": {r: {"read": v[0], "total": v[1], "cpu": v[2]} for r, v in med.items()},
              "ratio_openslide_over_tiles": med["openslide"][1] / med["tiles"][1],
              "ratio_openslide_over_reduced": med["openslide"][1] / med["reduced"][1],
              "mask_pixels_differing": differing, "reduced_mask_pixels_differing": reduced_differing}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.slide}: tissue detection at 1.25x from level {level} ({size[0]} x {size[1]} px) shrunk "
          f"{result['shrink']:g}x, mask {masks['tiles'].shape[1]} x {masks['tiles'].shape[0]}; median of "
          f"{args.rounds} rounds")
    for reader, (read_s, total_s, cpu_s) in med.items():
        print(f"  {reader:9s}: {total_s:.3f} s (level read {read_s:.3f} s, thresholding + closing "
              f"{total_s - read_s:.3f} s; CPU {cpu_s:.3f} s over all threads)")
    print(f"  tiles {result['ratio_openslide_over_tiles']:.2f}x faster, reduced "
          f"{result['ratio_openslide_over_reduced']:.2f}x"
          + ("" if served else " (tiles could not serve this level: all read through OpenSlide)"))
    print(f"  mask pixels differing from OpenSlide's: tiles {differing}, reduced {reduced_differing} "
          f"({reduced_differing / masks['tiles'].size:.2%}; its pixels are a scaled decode, not block means) "
          f"of {masks['tiles'].size}")
    return 0


def _time(path, mpp, reader, coords, size, magnification):
    from h2g.io.slide import Slide

    with Slide(path, mpp=mpp, reader=reader) as slide:
        served = slide._tiles is not None
        t0 = time.perf_counter()
        patches = [slide.read_region(tuple(c), (size, size), magnification) for c in coords]
        return time.perf_counter() - t0, patches, served


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tissue:
        return bench_tissue(args)
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
    times = {"openslide": [], args.reader: []}
    served = False
    for k in range(args.rounds):
        order = (args.reader, "openslide") if k % 2 == 0 else ("openslide", args.reader)
        got = {}
        for reader in order:
            seconds, got[reader], tiled = _time(args.slide, args.mpp, reader, coords, args.patch_size,
                                                args.magnification)
            times[reader].append(seconds)
            served = served or (reader != "openslide" and tiled)
    diffs = np.concatenate([np.abs(a.astype(np.int16) - b).ravel() for a, b in zip(got["openslide"], got[args.reader])])
    ms = {r: 1e3 * float(np.median(v)) / len(coords) for r, v in times.items()}
    result = {
        "slide": str(args.slide), "magnification": args.magnification, "patch_size": args.patch_size,
        "downsample": downsample, "level_downsamples": levels, "patches": len(coords), "rounds": args.rounds,
        "reader": args.reader, "tiles_served": served, "ms_per_patch": ms,
        "ratio_openslide_over_tiles": ms["openslide"] / ms[args.reader],
        "pixel_diff_max": int(diffs.max()), "pixel_diff_mean": float(diffs.mean()),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.slide}: {len(coords)} patches of {args.patch_size} px at {args.magnification:g}x "
              f"(downsample {downsample:g}; levels {levels}), median of {args.rounds} rounds, one thread")
        print(f"  OpenSlide {ms['openslide']:.3f} ms/patch, {args.reader} {ms[args.reader]:.3f} ms/patch: "
              f"{args.reader} {result['ratio_openslide_over_tiles']:.2f}x faster"
              + ("" if served else " (tiles could not serve this slide: both read through OpenSlide)"))
        print(f"  pixel |OpenSlide - {args.reader}|: max {result['pixel_diff_max']}, mean {result['pixel_diff_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
