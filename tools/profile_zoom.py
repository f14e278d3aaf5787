#!/usr/bin/env python
"""Profile RAZN's conditional zoom over a slide (h2g.inference.zoom.zoom_segmentation) with
stand-in networks, and the share of its time spent in the stitcher's final division, for
the current ``Stitcher.result`` and the former boolean-mask formula, in one run.

    python tools/profile_zoom.py --slide S [--size 64] [--magnification 5] [--classes 5]
                                 [--repeats 3] [--top 12]

The networks are numpy stand-ins that cost what tiny trained networks do (a per-pixel
linear map and softmax to ``--classes`` classes; the policy zooms regions whose mean red
is above 0.5), so the profile shows the pipeline's own work: reading, splitting,
stitching.  Each formula runs ``--repeats`` times under cProfile (best total kept); the
printed lines are seconds in ``Stitcher.result`` against the whole run, and the top
functions by own time of the current formula's run.  The two formulas' rasters are
compared bit for bit.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--size", type=int, default=64, help="region side S in px at --magnification (default 64)")
    p.add_argument("--magnification", type=float, default=5.0, help="x0's magnification (default 5)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="functions listed from the profile (default 12)")
    return p.parse_args(argv)


class _Network:
    """A numpy stand-in: per-pixel softmax of a fixed linear map of RGB to ``classes``."""

    input_names = ("image",)
    metadata = None

    def __init__(self, name: str, classes: int, seed: int):
        self.source = name
        self.weights = np.random.default_rng(seed).normal(0, 4, (3, classes)).astype(np.float32)

    def predict(self, x):
        logits = np.asarray(x, np.float32) @ self.weights
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=-1, keepdims=True)


class _Policy(_Network):
    def predict(self, x):
        return (np.asarray(x)[..., 0].mean(axis=(1, 2)) > 0.5).astype(np.float32)[:, None] * 0.8 + 0.1


def masked_result(self):
    """The former ``Stitcher.result``: boolean-mask gather, divide, scatter."""
    covered = self.weight > 0
    probs = np.zeros_like(self.sum)
    probs[covered] = self.sum[covered] / self.weight[covered][:, None]
    return probs, covered


def profile_run(slide, networks, tissue, args) -> tuple[float, float, pstats.Stats, np.ndarray]:
    """(total s, s in Stitcher.result, stats, probs) of one profiled zoom run."""
    from h2g.inference.zoom import zoom_segmentation

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    raster, _ = zoom_segmentation(slide, *networks, size=args.size, magnification=args.magnification,
                                  tissue=tissue, progress=False)
    profiler.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    in_result = sum(row[3] for (path, _, function), row in stats.stats.items()  # row[3]: cumulative s
                    if function == "masked_result" or (function == "result" and path.endswith("sliding.py")))
    return total, in_result, stats, raster.probs


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.core.errors import ConfigError
    from h2g.inference import sliding
    from h2g.io.slide import Slide
    from h2g.tiling.tissue import detect_tissue

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    networks = (_Policy("policy", 1, 0), _Network("coarse", args.classes, 1), _Network("fine", args.classes, 2))
    current = sliding.Stitcher.result
    best: dict = {}
    with Slide(args.slide, mpp=args.mpp, reader="tiles") as slide:
        tissue = detect_tissue(slide)
        for _ in range(args.repeats):
            for name, method in (("current", current), ("former (boolean mask)", masked_result)):
                sliding.Stitcher.result = method
                try:
                    run = profile_run(slide, networks, tissue, args)
                finally:
                    sliding.Stitcher.result = current
                if name not in best or run[0] < best[name][0]:
                    best[name] = run
        dims = slide.dimensions
    same = np.array_equal(best["current"][3].view(np.uint32), best["former (boolean mask)"][3].view(np.uint32))
    shape = best["current"][3].shape
    print(f"{args.slide} ({dims[0]} x {dims[1]} px): zoom regions of {args.size} px at {args.magnification:g}x, "
          f"raster {shape[1]} x {shape[0]} x {shape[2]}; best of {args.repeats} profiled runs")
    for name, (total, in_result, _, _) in best.items():
        print(f"  {name:22s}: run {total:.3f} s, Stitcher.result {in_result:.3f} s = {100 * in_result / total:.1f} %")
    print(f"  rasters identical to the bit: {same}")
    out = io.StringIO()
    best["current"][2].stream = out
    best["current"][2].sort_stats("tottime").print_stats(args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-4000:])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
