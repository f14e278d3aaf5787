"""Sampler batches as ``tf.data`` datasets that never stall the training step.

- :func:`patch_dataset`: H2G-Net's ``(images (B, S, S, 3), one-hot labels (B, C))``, one
  10x patch per draw (:func:`read_batch`).
- :func:`sample_dataset`: any system's ``({view name: images (B, S, S, 3)}, target)``,
  where the views (:mod:`h2g.data.views`) are co-centred on the drawn patch's centre and
  the target is the patch's class (one-hot) or the pixel label map of one view
  (:func:`read_samples`).

Batch ``k`` depends only on ``(sampler seed, stream, k)``: its draws and one
augmentation seed per sample come from :meth:`HierarchicalSampler.batch_arrays`, and
sample ``i`` is augmented with seed ``i`` whichever reader thread reads it.  So a run
resumes at any batch (``start_batch``), and batches do not depend on ``readers``.

Each batch is one ``tf.numpy_function`` call whose samples are read, and augmented, on
the process's reader pool (:func:`h2g.data.readers.reader_pool`).  The function is
declared ``stateful=False``: its result depends on the batch index only, which lets
``tf.data`` run two batches at once and prefetch even under
``tf.config.experimental.enable_op_determinism`` (which runs stateful map functions
one after the other, with no prefetch: the training step would wait for every batch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from h2g.core.errors import ConfigError, SamplerError
from h2g.core.resources import available_cores
from h2g.data.readers import (
    grid_centre,
    read_label_view,
    read_patch,
    read_sample,
    reader_pool,
    slide_of,
)
from h2g.data.sampler import (
    NUM_CLASSES,
    TRAIN_STREAM,
    VALIDATION_STREAM,
    Augment,
    BatchDraw,
    HierarchicalSampler,
)
from h2g.data.views import View, check_views

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    import tensorflow as tf

    from h2g.io.annotation import Annotation

_BATCHES_IN_FLIGHT = 2  # batches being read at once: the readers start the next early
TARGETS = ("class", "pixels")

#: ``(views {name: (S, S, 3) uint8}, pixel target (S, S) uint8 or None, seed) ->
#: (views, target)``: augments one sample, every view and the target together.
SampleAugment = Callable[[dict, "np.ndarray | None", int], tuple[dict, "np.ndarray | None"]]


def each_view(augment: Augment) -> SampleAugment:
    """A :data:`SampleAugment` applying the image augmenter ``augment(image, seed)`` to
    every view with the sample's seed (the views of a sample get the same flips and
    colour shifts when they have the same size).  The pixel target is passed through
    unchanged, so use it with class targets or photometric-only augmenters; geometric
    augmentation of a pixel target needs an augmenter that moves views and target
    together."""
    def sample_augment(views: dict, target, seed: int):
        return {name: augment(image, seed) for name, image in views.items()}, target

    return sample_augment


def shard_of(batch: BatchDraw, shard: tuple[int, int] | None) -> BatchDraw:
    """The ``shard = (index, count)`` part of a drawn global batch: its ``index``-th of
    ``count`` equal contiguous slices (``None``: the whole batch).  Replicas reading the
    shards of one batch read disjoint samples whose union, in shard order, is the batch
    an unsharded reader reads, with the same augmentation seeds."""
    if shard is None:
        return batch
    index, count = shard
    n = len(batch.labels)
    if count < 1 or not 0 <= index < count or n % count:
        raise ConfigError(f"shard {index} of {count}: the batch of {n} samples must split into {count} "
                          "equal shards (make the global batch size a multiple of the replicas)")
    part = slice(index * n // count, (index + 1) * n // count)
    return BatchDraw(batch.slide_index[part], batch.coords[part], batch.labels[part], batch.seeds[part])


def _shard_size(batch_size: int, shard: tuple[int, int] | None) -> int:
    if shard is None:
        return batch_size
    if shard[1] < 1 or batch_size % shard[1]:
        raise ConfigError(f"batch_size {batch_size} does not split into {shard[1]} equal shards "
                          "(make the global batch size a multiple of the replicas)")
    return batch_size // shard[1]


def _read_in_pool(n: int, read_one: Callable[[int], None], readers: int | None) -> None:
    """``read_one(i)`` for ``i < n`` on the reader pool; re-raises a reader's error."""
    list(reader_pool(readers or available_cores()).map(read_one, range(n)))


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
    shard: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``batch_index`` of ``stream`` read (and augmented) on :func:`reader_pool`:
    ``(images (B, S, S, 3) uint8, labels (B,) int32)``; each image is the patch whose
    top-left corner the sampler drew (:func:`~h2g.data.readers.read_patch`).  Patch
    ``i`` is augmented with the ``i``-th seed drawn with the batch, so the result does
    not depend on ``readers``.  With ``shard``, only that part of the batch is read
    (:func:`shard_of`)."""
    batch = shard_of(sampler.batch_arrays(batch_index, batch_size, stream), shard)
    n = len(batch.labels)
    images = np.empty((n, patch_size, patch_size, 3), np.uint8)

    def read(i: int) -> None:
        source = sampler.sources[batch.slide_index[i]]
        x, y = batch.coords[i]
        image = read_patch(source, int(x), int(y), magnification=magnification, patch_size=patch_size)
        images[i] = image if augment is None else augment(image, int(batch.seeds[i]))

    _read_in_pool(n, read, readers)
    return images, batch.labels


def read_samples(
    sampler: HierarchicalSampler,
    batch_index: int,
    batch_size: int,
    views: Sequence[View],
    *,
    stream: int = TRAIN_STREAM,
    target: str = "class",
    target_view: str | None = None,
    augment: SampleAugment | None = None,
    readers: int | None = None,
    annotations: Mapping[str, "Annotation"] | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Batch ``batch_index`` of ``stream`` as ``({view name: (B, S, S, 3) uint8},
    target)``, read (and augmented) on :func:`reader_pool`.  Every view of sample ``i``
    is centred on the centre of the grid patch the sampler drew.  ``target="class"``
    gives the patches' labels ``(B,)`` int32; ``target="pixels"`` the label maps
    ``(B, S, S)`` uint8 of ``target_view`` (:func:`~h2g.data.readers.read_label_view`;
    255 = ignore) from ``annotations[slide_id]``, or the source's ``annotation``.  With
    ``shard``, only that part of the batch is read (:func:`shard_of`)."""
    views = check_views(views)
    several = _several_targets(target, target_view)
    specs = ([_target_view(views, target, name) for name in target_view] if several
             else [_target_view(views, target, target_view)])
    target_spec = specs[0]
    batch = shard_of(sampler.batch_arrays(batch_index, batch_size, stream), shard)
    n = len(batch.labels)
    images = {v.name: np.empty((n, v.size, v.size, 3), np.uint8) for v in views}
    pixels = None if target_spec is None else {s.name: np.empty((n, s.size, s.size), np.uint8) for s in specs}

    def read(i: int) -> None:
        source = sampler.sources[batch.slide_index[i]]
        slide = slide_of(source)
        centre = grid_centre(source.grid, slide, *(float(v) for v in batch.coords[i]))
        sample = read_sample(slide, centre, views)
        label_map = None
        if target_spec is not None:
            annotation = _annotation(source, annotations)
            label_map = {s.name: read_label_view(annotation, slide, centre, s) for s in specs}
            if not several:
                label_map = label_map[target_spec.name]
        if augment is not None:
            sample, label_map = augment(sample, label_map, int(batch.seeds[i]))
        for name, image in sample.items():
            images[name][i] = image
        if pixels is not None:
            for name, labels in (label_map.items() if several else [(target_spec.name, label_map)]):
                pixels[name][i] = labels

    _read_in_pool(n, read, readers)
    if pixels is None:
        return images, batch.labels
    return images, (pixels if several else pixels[target_spec.name])


def _several_targets(target: str, target_view) -> bool:
    """Whether ``target_view`` names several views (pixel targets of each: a dict)."""
    if isinstance(target_view, (tuple, list)):
        if target != "pixels" or not target_view:
            raise ConfigError(f"several target views need target='pixels' and at least one name, got {target_view}")
        return True
    return False


def _target_view(views: tuple[View, ...], target: str, target_view: str | None) -> View | None:
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "class":
        if target_view is not None:
            raise ConfigError("target_view is for pixel targets; a class target has none")
        return None
    by_name = {v.name: v for v in views}
    if target_view is None and len(views) == 1:
        return views[0]
    if target_view not in by_name:
        raise ConfigError(f"a pixel target needs target_view, one of the views {sorted(by_name)}; "
                          f"got {target_view!r}")
    return by_name[target_view]


def _annotation(source, annotations: Mapping[str, "Annotation"] | None) -> "Annotation":
    annotation = (annotations or {}).get(source.slide_id) or getattr(source, "annotation", None)
    if annotation is None:
        raise SamplerError(f"slide {source.slide_id} ({source.slide_path}): a pixel target needs "
                           "its annotation, and none was given")
    return annotation


def _batch_indices(batch_size: int, training: bool, start_batch: int, n_batches: int | None,
                   readers: int | None) -> int:
    """Check the batching arguments; returns the seed stream."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if readers is not None and readers < 1:
        raise ConfigError(f"readers must be >= 1 (or None: one per core), got {readers}")
    if start_batch < 0 or (n_batches is not None and n_batches < 1):
        raise ConfigError(f"start_batch must be >= 0 and n_batches >= 1, got {start_batch}, {n_batches}")
    if not training and n_batches is None:
        raise ConfigError("a validation dataset needs n_batches (a fixed set of batches per epoch)")
    return TRAIN_STREAM if training else VALIDATION_STREAM


def _dataset(read: Callable[[int], list], out_types: list, shapes: list, finish: Callable, *,
             start_batch: int, n_batches: int | None, prefetch: int | None) -> tf.data.Dataset:
    """Batches ``start_batch ...`` (``n_batches`` of them, or forever): ``read(k)``'s
    arrays in one stateless ``tf.numpy_function``, their static shapes set, then
    ``finish(*tensors)``; two batches in flight, ``prefetch`` (default AUTOTUNE) ready."""
    import tensorflow as tf

    def read_graph(batch_index):
        parts = tf.numpy_function(lambda k: read(int(k)), [batch_index], out_types, stateful=False)
        for part, shape in zip(parts, shapes):
            part.set_shape(shape)
        return finish(*parts)

    if n_batches is None:
        indices = tf.data.Dataset.counter(start_batch)
    else:
        indices = tf.data.Dataset.range(start_batch, start_batch + n_batches)
    return indices.map(read_graph, num_parallel_calls=_BATCHES_IN_FLIGHT, deterministic=True).prefetch(
        tf.data.AUTOTUNE if prefetch is None else prefetch
    )


def _n_classes(sampler, n_classes: int | None) -> int:
    n = getattr(sampler, "n_classes", NUM_CLASSES) if n_classes is None else n_classes
    if int(n) < 2:
        raise ConfigError(f"n_classes must be >= 2, got {n}")
    return int(n)


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
    shard: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(images, labels)`` batches drawn by ``sampler``:
    images ``(batch_size, patch_size, patch_size, 3)`` float32 in [0, 1], labels one-hot
    ``(batch_size, n_classes)`` float32 (``sampler.n_classes``, 2 for tumour masks).

    Training (``training=True``) yields batches ``start_batch, start_batch + 1, ...`` of
    the training stream, forever unless ``n_batches`` is given; resume a run at batch
    ``k`` with ``start_batch=k``.  Validation (``training=False``) needs ``n_batches`` and
    yields the same batches of the validation stream every time it is iterated.

    Each batch is one stateless ``tf.numpy_function`` call (:func:`read_batch`) whose
    patches are read by ``readers`` threads (default: one per core); two batches are in
    flight so the readers never wait for the next one, and ``prefetch`` batches
    (default: AUTOTUNE) are kept ready.  Batches are identical whatever ``readers`` is.

    ``shard = (index, count)``: each element is only the ``index``-th of ``count`` equal
    slices of the global batch of ``batch_size`` (one replica's part, for
    :mod:`h2g.training.distribute`); replicas never read the same patches of a batch."""
    import tensorflow as tf

    stream = _batch_indices(batch_size, training, start_batch, n_batches, readers)
    n_classes = _n_classes(sampler, None)
    size = _shard_size(batch_size, shard)

    def read(batch_index: int) -> list:
        return list(read_batch(sampler, batch_index, batch_size, stream=stream, augment=augment,
                               readers=readers, magnification=magnification, patch_size=patch_size,
                               shard=shard))

    def finish(images, labels):
        return tf.cast(images, tf.float32) / 255.0, tf.one_hot(labels, n_classes, dtype=tf.float32)

    return _dataset(read, [tf.uint8, tf.int32], [[size, patch_size, patch_size, 3], [size]],
                    finish, start_batch=start_batch, n_batches=n_batches, prefetch=prefetch)


def sample_dataset(
    sampler: HierarchicalSampler,
    views: Sequence[View],
    *,
    target: str = "class",
    target_view: str | None = None,
    batch_size: int,
    training: bool = True,
    augment: SampleAugment | None = None,
    start_batch: int = 0,
    n_batches: int | None = None,
    readers: int | None = None,
    n_classes: int | None = None,
    annotations: Mapping[str, "Annotation"] | None = None,
    prefetch: int | None = None,
    shard: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(inputs, target)`` batches drawn by ``sampler``:
    ``inputs`` is ``{view.name: (batch_size, view.size, view.size, 3) float32 in [0, 1]}``
    with every view centred on the drawn grid patch's centre (:func:`read_samples`).

    ``target="class"``: the patches' classes one-hot, ``(batch_size, n_classes)``
    float32 (``n_classes`` defaults to ``sampler.n_classes``, 2 for tumour masks).
    ``target="pixels"``: the label map of ``target_view`` (the only view by default),
    ``(batch_size, S, S)`` int32 class indices, 255 where unlabelled (``target_view`` a
    tuple of view names: ``{name: label map}``, the augmenter then gets and returns such
    a dict); annotations come
    from ``annotations[slide_id]`` or the source's ``annotation`` attribute.

    ``augment`` (a :data:`SampleAugment`; :func:`each_view` adapts an image augmenter)
    gets each sample's seed.  Batching, resuming, validation, readers, prefetching and
    ``shard`` are those of :func:`patch_dataset`; batches are identical whatever
    ``readers`` is."""
    import tensorflow as tf

    views = check_views(views)
    stream = _batch_indices(batch_size, training, start_batch, n_batches, readers)
    several = _several_targets(target, target_view)
    specs = [_target_view(views, target, name) for name in target_view] if several else []
    target_spec = specs[0] if several else _target_view(views, target, target_view)
    classes = _n_classes(sampler, n_classes)
    names = [v.name for v in views]
    size = _shard_size(batch_size, shard)

    def read(batch_index: int) -> list:
        images, labels = read_samples(sampler, batch_index, batch_size, views, stream=stream, target=target,
                                      target_view=target_view, augment=augment, readers=readers,
                                      annotations=annotations, shard=shard)
        if several:
            return [images[name] for name in names] + [labels[s.name] for s in specs]
        return [images[name] for name in names] + [labels]

    def finish(*parts):
        inputs = {name: tf.cast(part, tf.float32) / 255.0 for name, part in zip(names, parts)}
        if several:
            return inputs, {s.name: tf.cast(part, tf.int32) for s, part in zip(specs, parts[len(names):])}
        if target_spec is None:
            return inputs, tf.one_hot(parts[-1], classes, dtype=tf.float32)
        return inputs, tf.cast(parts[-1], tf.int32)

    shapes = [[size, v.size, v.size, 3] for v in views]
    if several:
        out_types = [tf.uint8] * (len(views) + len(specs))
        shapes = shapes + [[size, s.size, s.size] for s in specs]
    elif target_spec is None:
        out_types, shapes = [tf.uint8] * len(views) + [tf.int32], shapes + [[size]]
    else:
        out_types = [tf.uint8] * len(views) + [tf.uint8]
        shapes = shapes + [[size, target_spec.size, target_spec.size]]
    return _dataset(read, out_types, shapes, finish, start_batch=start_batch, n_batches=n_batches,
                    prefetch=prefetch)
