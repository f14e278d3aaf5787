#!/usr/bin/env python
"""Benchmark the hierarchical sampler's tf.data pipeline against a plain reading loop.

    python tools/bench_sampler.py --manifest M --batches N [--split train] [--batch-size 64]
                                  [--readers K] [--repeats 3] [--seed 0] [--json]

Both sides read the same kind of work, 10x patches drawn by the sampler from one split:

- ``sequential_patches_per_s``: a plain loop on one thread, read_region (with its resize)
  patch after patch, no tf.data and no augmentation;
- ``pipeline_patches_per_s``: :func:`h2g.data.dataset.patch_dataset` with the classifier
  augmentation on and ``--readers`` reader threads (default: one per core), in its steady
  state: the first three batches (start-up, batches in flight) are not timed.

Every batch is read once: in a round the loop reads N batches and the pipeline the next
N + 3, so neither side reads tiles the other just put in OpenSlide's cache.  The sides
alternate for ``--repeats`` rounds and the best rate of each is reported (other
processes on a shared machine only ever slow a side down); ``rounds`` lists every
measurement.  ``ratio`` is pipeline / sequential; ``cpu_cores`` the cores
this process may run on.  Bad input: exit code 2 and a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError

WARMUP = 3  # pipeline batches not timed: start-up, and the batches in flight at first


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.io.manifest import DEFAULT_MANIFEST

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    add_verbose_argument(parser)
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help="data manifest (default: the repository's data_manifest.csv)")
    parser.add_argument("--split", default="train", help="manifest split to sample (default train)")
    parser.add_argument("--batches", type=int, default=10, help="batches timed per side (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per batch (default 64)")
    parser.add_argument("--readers", type=int, default=None,
                        help="reader threads of the pipeline (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating rounds; the best of each side is reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def time_sequential(sampler, first: int, batches: int, batch_size: int) -> float:
    """Patches per second of a plain loop over batches ``first .. first + batches - 1``."""
    from h2g.data.readers import read_patch

    start = time.perf_counter()
    for b in range(first, first + batches):
        arrays = sampler.batch_arrays(b, batch_size)
        for s, (x, y) in zip(arrays.slide_index, arrays.coords):
            read_patch(sampler.sources[s], int(x), int(y))
    return batches * batch_size / (time.perf_counter() - start)


def time_pipeline(sampler, first: int, batches: int, batch_size: int, readers: int | None) -> float:
    """Patches per second of the augmented tf.data pipeline in its steady state: of the
    batches ``first .. first + WARMUP + batches - 1`` it yields, the first ``WARMUP`` (which
    start TensorFlow and the readers, and overlap in flight) are not timed; the rate is
    ``batches`` batches over the time from the last warm-up batch to the last batch."""
    from h2g.data.augment import classifier_augmenter
    from h2g.data.dataset import patch_dataset

    dataset = patch_dataset(sampler, batch_size=batch_size, augment=classifier_augmenter(),
                            start_batch=first, n_batches=WARMUP + batches, readers=readers)
    arrivals = [time.perf_counter() for _ in dataset]
    return batches * batch_size / (arrivals[-1] - arrivals[WARMUP - 1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.batches, args.batch_size, args.repeats) < 1:
        raise ConfigError("--batches, --batch-size and --repeats must be >= 1, got "
                          f"{args.batches}, {args.batch_size}, {args.repeats}")
    from h2g.core.resources import available_cores
    from h2g.data.sampler import HierarchicalSampler, build_sources
    from h2g.io.manifest import load_manifest

    records = load_manifest(args.manifest).split(args.split)
    sources = build_sources(records, progress=not args.json)
    sampler = HierarchicalSampler(sources, seed=args.seed)
    rounds = []
    for r in range(args.repeats):
        first = r * (2 * args.batches + WARMUP)  # every batch is read once
        rounds.append({
            "sequential": round(time_sequential(sampler, first, args.batches, args.batch_size), 1),
            "pipeline": round(time_pipeline(sampler, first + args.batches, args.batches,
                                            args.batch_size, args.readers), 1),
        })
    sequential = max(r["sequential"] for r in rounds)
    pipeline = max(r["pipeline"] for r in rounds)
    result = {
        "sequential_patches_per_s": round(sequential, 1),
        "pipeline_patches_per_s": round(pipeline, 1),
        "ratio": round(pipeline / sequential, 3),
        "cpu_cores": available_cores(),
        "readers": args.readers or available_cores(),
        "batches": args.batches,
        "batch_size": args.batch_size,
        "split": args.split,
        "slides": len(sources),
        "rounds": rounds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
