"""(split from h2g.sampling; docstring to write)"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from h2g.core.errors import ConfigError
from h2g.core.resources import available_cores
from h2g.data.readers import read_patch, reader_pool
from h2g.data.sampler import (
    NUM_CLASSES,
    TRAIN_STREAM,
    VALIDATION_STREAM,
    Augment,
    HierarchicalSampler,
)

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    import tensorflow as tf

_BATCHES_IN_FLIGHT = 2  # batches being read at once: the readers start the next early


def read_batch(
    sampler: HierarchicalSampler,
    batch_index: int,
    batch_size: int,
    *,
    stream: int = TRAIN_STREAM,
    augment: Augment | None = None,
    readers: int | None = None,
    magnification: float = 10.0,
    patch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``batch_index`` of ``stream`` read (and augmented) on :func:`reader_pool`:
    ``(images (B, S, S, 3) uint8, labels (B,) int32)``.  Patch ``i`` is augmented with
    the ``i``-th seed drawn with the batch, so the result does not depend on ``readers``."""
    batch = sampler.batch_arrays(batch_index, batch_size, stream)
    images = np.empty((batch_size, patch_size, patch_size, 3), np.uint8)

    def read(i: int) -> None:
        source = sampler.sources[batch.slide_index[i]]
        x, y = batch.coords[i]
        image = read_patch(source, int(x), int(y), magnification=magnification, patch_size=patch_size)
        images[i] = image if augment is None else augment(image, int(batch.seeds[i]))

    list(reader_pool(readers or available_cores()).map(read, range(batch_size)))  # re-raises a reader's error
    return images, batch.labels


def patch_dataset(
    sampler: HierarchicalSampler,
    *,
    batch_size: int,
    training: bool = True,
    augment: Augment | None = None,
    start_batch: int = 0,
    n_batches: int | None = None,
    readers: int | None = None,
    magnification: float = 10.0,
    patch_size: int = 256,
    prefetch: int | None = None,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(images, labels)`` batches drawn by ``sampler``:
    images ``(batch_size, patch_size, patch_size, 3)`` float32 in [0, 1], labels one-hot
    ``(batch_size, 2)`` float32.

    Training (``training=True``) yields batches ``start_batch, start_batch + 1, ...`` of
    the training stream, forever unless ``n_batches`` is given; resume a run at batch
    ``k`` with ``start_batch=k``.  Validation (``training=False``) needs ``n_batches`` and
    yields the same batches of the validation stream every time it is iterated.

    Each batch is one ``tf.numpy_function`` call (:func:`read_batch`) whose patches are
    read by ``readers`` threads (default: one per core); two batches are in flight so
    the readers never wait for the next one, and ``prefetch`` batches (default:
    AUTOTUNE) are kept ready.  Batches are identical whatever ``readers`` is."""
    import tensorflow as tf

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if readers is not None and readers < 1:
        raise ConfigError(f"readers must be >= 1 (or None: one per core), got {readers}")
    if start_batch < 0 or (n_batches is not None and n_batches < 1):
        raise ConfigError(f"start_batch must be >= 0 and n_batches >= 1, got {start_batch}, {n_batches}")
    if not training and n_batches is None:
        raise ConfigError("a validation dataset needs n_batches (a fixed set of batches per epoch)")
    stream = TRAIN_STREAM if training else VALIDATION_STREAM

    def read(batch_index):
        return read_batch(sampler, int(batch_index), batch_size, stream=stream, augment=augment,
                          readers=readers, magnification=magnification, patch_size=patch_size)

    def read_graph(batch_index):
        images, labels = tf.numpy_function(read, [batch_index], [tf.uint8, tf.int32])
        images.set_shape([batch_size, patch_size, patch_size, 3])
        labels.set_shape([batch_size])
        return tf.cast(images, tf.float32) / 255.0, tf.one_hot(labels, NUM_CLASSES, dtype=tf.float32)

    if n_batches is None:
        indices = tf.data.Dataset.counter(start_batch)
    else:
        indices = tf.data.Dataset.range(start_batch, start_batch + n_batches)
    return indices.map(read_graph, num_parallel_calls=_BATCHES_IN_FLIGHT, deterministic=True).prefetch(
        tf.data.AUTOTUNE if prefetch is None else prefetch
    )
