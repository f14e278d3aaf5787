"""The refinement stage (Section 2.5): per-slide 1024x1024 inputs (low-resolution image +
patch heatmap) and targets, and the tf.data pipeline that feeds them to training.
Prediction goes through :func:`h2g.inference.lowres.refine`, as in deployment.

The same inputs serve design (II) UNet-LR (image only) and designs (VI-IX) (image +
heatmap).  Inputs are built by :func:`h2g.inference.lowres.refinement_inputs`, the one place that
defines them for training and for deployment alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from h2g.core.errors import ConfigError
from h2g.inference.lowres import target_mask  # noqa: F401  (the refinement targets)


@dataclass
class RefinementSample:
    """One slide at the refinement resolution."""

    slide_id: str
    grade: int
    image: np.ndarray  # (S, S, 3) float32 in [0, 1]
    heatmap: np.ndarray  # (S, S, 1) float32 in [0, 1]
    mask: np.ndarray | None  # (S, S) bool tumour ground truth, None without annotation


def refinement_dataset(
    samples: list[RefinementSample],
    *,
    batch_size: int,
    seed: int,
    with_heatmap: bool = True,
    augment: Callable | None = None,
    start_batch: int = 0,
    training: bool = True,
    n_outputs: int = 1,
    shard: tuple[int, int] | None = None,
):
    """A tf.data pipeline of ``(inputs, one-hot target)`` batches.

    Training: infinite; batch ``b`` holds ``batch_size`` slides drawn without replacement
    by a generator seeded from ``(seed, b)`` and augmented with per-sample seeds, so it is
    the same whatever ran before it (resume starts at ``start_batch``).  Validation:
    every sample once, in order, unaugmented, the same every time it is iterated.
    A model with ``n_outputs`` (deep supervision) gets the same target for each.
    ``shard = (index, count)``: each training batch is only the ``index``-th of ``count``
    contiguous parts of the global batch of ``batch_size`` (one replica's part under
    :mod:`h2g.training.distribute`), with the seeds the whole batch would use.
    """
    import tensorflow as tf

    images = np.stack([s.image for s in samples]).astype(np.float32)
    heats = np.stack([s.heatmap for s in samples]).astype(np.float32)
    masks = np.stack([s.mask for s in samples]).astype(np.float32)
    size = images.shape[1]

    def pack(image, heat, mask):
        target = tf.stack([1.0 - mask, mask], axis=-1)
        inputs = {"image": image, "heatmap": heat} if with_heatmap else image
        return inputs, target if n_outputs == 1 else (target,) * n_outputs

    if not training:
        ds = tf.data.Dataset.from_tensor_slices((images, heats, masks))
        return ds.batch(batch_size).map(pack)

    n = len(samples)
    index, count = shard or (0, 1)
    if count < 1 or not 0 <= index < count or batch_size % count:
        raise ConfigError(f"refinement batch_size {batch_size} does not split into {count} equal shards "
                          "(make the global batch size a multiple of the replicas)")
    part = batch_size // count

    def draw(batch_index):
        rng = np.random.default_rng([seed, int(batch_index)])
        chosen = rng.choice(n, size=batch_size, replace=batch_size > n)
        seeds = [int(rng.integers(2**31 - 1)) for _ in chosen] if augment is not None else None
        out_i, out_h, out_m = [], [], []
        for pos in range(index * part, (index + 1) * part):
            k = chosen[pos]
            image, heat, mask = images[k], heats[k, ..., 0], masks[k]
            if augment is not None:
                image, heat, mask = augment(image, heat, mask, seeds[pos])
            out_i.append(np.asarray(image, np.float32))
            out_h.append(np.asarray(heat, np.float32)[..., None])
            out_m.append(np.asarray(mask, np.float32))
        return np.stack(out_i), np.stack(out_h), np.stack(out_m)

    def load(batch_index):
        image, heat, mask = tf.numpy_function(draw, [batch_index], [tf.float32] * 3, stateful=False)
        image.set_shape((part, size, size, 3))
        heat.set_shape((part, size, size, 1))
        mask.set_shape((part, size, size))
        return pack(image, heat, mask)

    ds = tf.data.Dataset.range(start_batch, 2**62)
    return ds.map(load, num_parallel_calls=2, deterministic=True).prefetch(2)

