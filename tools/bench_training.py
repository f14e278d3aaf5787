#!/usr/bin/env python
"""Benchmark a training step fed by the streaming sampler against the same batches in memory.

    python tools/bench_training.py [--manifest M] [--steps 20] [--warmup 3] [--rounds 2]
                                   [--batch-size 32] [--readers 2] [--no-augment] [--seed 0] [--json]

The smoke preset's patch classifier (MobileNetV2, alpha 0.35, no pre-trained weights,
batch-norm momentum 0.9, Adam 1e-3, categorical cross-entropy) is trained, under op
determinism and with the batch dimension relaxed as :func:`h2g.training.fit.fit` does,
for ``--warmup + --steps`` steps on each of:

- ``streaming``: :func:`h2g.data.dataset.patch_dataset` on the hierarchical sampler of
  the ``--split`` slides, the classifier augmentation on (as in smoke training), patches
  read while the model trains;
- ``in_memory``: the very same batches (the same patches, augmentation and labels),
  read beforehand with :func:`h2g.data.dataset.read_batch` and fed by
  ``tf.data.Dataset.from_tensor_slices`` with the same uint8 -> float32 / one-hot map.

One model is compiled once; the sides alternate for ``--rounds`` rounds, each on fresh
batches.  A step's time is the interval between Keras' ``on_train_batch_end`` calls;
the first ``--warmup`` steps of each fit (pipeline start-up) are not counted.  Reported:
the median step time of each side over all rounds, ``ratio`` = streaming / in-memory
(the issue's target: at most 1.15), per-round medians, and the reading cost of one batch
alone (``read_s_per_batch``, the readers' wall time with no training).  The machine's
other load only ever slows a side down; run on a quiet machine for a clean figure.
Bad input: exit code 2 and a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.systems.registry import load_config
    from h2g.io.manifest import DEFAULT_MANIFEST

    smoke = load_config("smoke")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help="data manifest (default: the embedded smoke cohort, generated if missing)")
    parser.add_argument("--split", default="train", help="manifest split to sample (default train)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and round (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each fit (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--batch-size", type=int, default=smoke.classifier.batch_size,
                        help=f"patches per step (default {smoke.classifier.batch_size}, the smoke preset's)")
    parser.add_argument("--readers", type=int, default=smoke.sampler.readers,
                        help=f"reader threads (default {smoke.sampler.readers}, the smoke preset's)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="turn the classifier augmentation off (on in smoke training)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and model seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def build_model(seed: int):
    """The smoke preset's MobileNetV2 patch classifier, compiled like :func:`fit` does."""
    import keras

    from h2g import models
    from h2g.systems.registry import load_config

    c = load_config("smoke", seed).classifier
    keras.utils.set_random_seed(seed)
    model = models.build("mobilenetv2", alpha=c.alpha, weights=c.weights)
    models.set_batchnorm_momentum(model, c.bn_momentum)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=c.learning_rate),
                  loss="categorical_crossentropy")
    return model


def step_times(model, dataset, steps: int, warmup: int) -> list[float]:
    """Seconds of each step after ``warmup`` when ``model`` fits ``warmup + steps`` batches."""
    import keras

    from h2g.training.fit import dynamic_batch

    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    model.fit(dynamic_batch(dataset), epochs=1, steps_per_epoch=warmup + steps, callbacks=[Clock()],
              verbose=0, shuffle=False)
    return [b - a for a, b in itertools.pairwise(ends[warmup - 1:])]  # warmup >= 1


def in_memory(sampler, first: int, n: int, batch_size: int, augment, readers: int):
    """Batches ``first .. first + n - 1`` read now, as a dataset yielding what
    :func:`patch_dataset` yields for them; also the wall seconds per batch read."""
    import numpy as np
    import tensorflow as tf

    from h2g.data.dataset import read_batch

    t0 = time.perf_counter()
    read = [read_batch(sampler, k, batch_size, augment=augment, readers=readers) for k in range(first, first + n)]
    seconds = (time.perf_counter() - t0) / n
    images = tf.constant(np.stack([r[0] for r in read]))
    labels = tf.constant(np.stack([r[1] for r in read]))
    n_classes = getattr(sampler, "n_classes", 2)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).map(
        lambda x, y: (tf.cast(x, tf.float32) / 255.0, tf.one_hot(y, n_classes, dtype=tf.float32)))
    return dataset.prefetch(tf.data.AUTOTUNE), seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size, args.readers) < 1 or args.warmup < 1:
        raise ConfigError("--steps, --rounds, --batch-size, --readers and --warmup must be >= 1, got "
                          f"{args.steps}, {args.rounds}, {args.batch_size}, {args.readers}, {args.warmup}")
    import tensorflow as tf

    from h2g.systems.registry import load_config
    from h2g.core.resources import available_cores
    from h2g.data.augment import ClassifierAugmentConfig, classifier_augmenter
    from h2g.data.embedded import ensure_cohort
    from h2g.data.dataset import patch_dataset
    from h2g.data.sampler import HierarchicalSampler, build_sources
    from h2g.io.manifest import load_manifest

    c = load_config("smoke", args.seed)
    records = load_manifest(ensure_cohort(args.manifest)).split(args.split)
    sources = build_sources(records, magnification=c.patches.magnification, patch_size=c.patches.patch_size,
                            tissue_threshold=c.patches.tissue_threshold,
                            tumour_threshold=c.patches.tumour_threshold, progress=not args.json)
    sampler = HierarchicalSampler(sources, stages=c.sampler.stages, seed=args.seed)
    augment = classifier_augmenter(ClassifierAugmentConfig()) if args.augment else None
    tf.config.experimental.enable_op_determinism()  # as fit() does
    model = build_model(args.seed)
    per_fit = args.warmup + args.steps
    streaming, memory, rounds, reads = [], [], [], []
    for r in range(args.rounds):
        first = 2 * r * per_fit  # every round trains on batches it has not read before
        stream = patch_dataset(sampler, batch_size=args.batch_size, augment=augment, start_batch=first,
                               n_batches=per_fit, readers=args.readers)
        s = step_times(model, stream, args.steps, args.warmup)
        data, read_s = in_memory(sampler, first + per_fit, per_fit, args.batch_size, augment, args.readers)
        m = step_times(model, data, args.steps, args.warmup)
        streaming += s
        memory += m
        reads.append(read_s)
        rounds.append({"streaming_s": round(statistics.median(s), 4), "in_memory_s": round(statistics.median(m), 4)})
    stream_s, memory_s = statistics.median(streaming), statistics.median(memory)
    result = {
        "streaming_step_s": round(stream_s, 4),
        "in_memory_step_s": round(memory_s, 4),
        "ratio": round(stream_s / memory_s, 3),
        "target": 1.15,
        "read_s_per_batch": round(statistics.median(reads), 4),
        "batch_size": args.batch_size,
        "readers": args.readers,
        "augment": args.augment,
        "steps": args.steps,
        "warmup": args.warmup,
        "cpu_cores": available_cores(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "slides": len(sources),
        "rounds": rounds,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"step time, median of {args.rounds} x {args.steps} steps ({args.batch_size} patches, "
          f"{args.readers} readers, augmentation {'on' if args.augment else 'off'}, {len(sources)} slides):")
    print(f"  streaming sampler  {stream_s:.4f} s")
    print(f"  same batches, RAM  {memory_s:.4f} s")
    print(f"  ratio              {result['ratio']:.3f}  (target <= {result['target']})")
    print(f"  reading one batch  {result['read_s_per_batch']:.4f} s wall, no training")
    for r, row in enumerate(rounds, 1):
        print(f"  round {r}: streaming {row['streaming_s']:.4f} s, in memory {row['in_memory_s']:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=True))
