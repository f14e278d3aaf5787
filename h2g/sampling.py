"""The hierarchical patch sampler of the paper (Section 2.3), streamed from raw slides.

Patches are never stored.  Each one is drawn by a tree of uniform choices, by default
(1) a histological grade among the grades that have slides, (2) a slide of that grade,
(3) a class among the classes that slide has patches of, (4) a patch of that class, and
then read from the whole-slide image at 10x with OpenSlide while training runs.

- :class:`SampleSource` is one slide ready for sampling: its id, path, mpp override,
  manifest attributes (grade, split, ...) and :class:`~h2g.patches.PatchGrid`.
  :func:`build_sources` makes them from manifest records.
- :class:`HierarchicalSampler` holds the tree.  Its stages are attribute names of the
  sources followed by ``"slide"``, ``"class"``, ``"patch"``, so a caller balances on
  another manifest column, or on none, by passing other stages.  Drawing is stateless:
  batch ``k`` comes from a generator seeded by ``(seed, stream, k)``, so a run resumes
  at any batch and the sequence does not depend on how many readers run in parallel.
- :func:`patch_dataset` turns a sampler into a ``tf.data.Dataset`` of
  ``(images float32 [0, 1] (B, S, S, 3), one-hot labels (B, 2))``.  Each batch is one
  ``tf.numpy_function`` call (:func:`read_batch`) whose patches are read, and augmented,
  by a shared pool of Python reader threads: OpenSlide's decoding and OpenCV's
  augmentation release the GIL, so the readers run in parallel, and their thread-local
  state persists (it would not in ``tf.numpy_function``'s own short-lived thread states).

Memory stays bounded: the sampler holds patch coordinates only, and the readers share
one OpenSlide handle per slide through :func:`h2g.wsi.open_slide`'s module-level cache.
TensorFlow is imported by :func:`patch_dataset` only; the rest works without it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from h2g.errors import ConfigError, SamplerError

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    import tensorflow as tf

    from h2g.manifest import SlideRecord
    from h2g.patches import PatchGrid

log = logging.getLogger(__name__)

CLASS_NAMES = ("non-tumour", "tumour")  # index = label (1 = tumour)
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_STAGES = ("grade", "slide", "class", "patch")
TRAIN_STREAM = 0  # seed streams: training and validation batches never share numbers
VALIDATION_STREAM = 1

Draw = tuple[str, int, int, int]  # (slide_id, x, y, label)
Augment = Callable[[np.ndarray, int], np.ndarray]

# Record fields that describe where a slide is rather than what it is.
_LOCATION_FIELDS = ("slide_id", "slide_path", "annotation_path", "mpp")
_SEED_LIMIT = 2**31  # augmentation seeds lie in [0, 2**31)
_BATCHES_IN_FLIGHT = 2  # batches being read at once: the readers start the next early
_POOLS: dict[int, ThreadPoolExecutor] = {}  # reader pools by size (see reader_pool)
_POOLS_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_POOLS.clear)


@dataclass(frozen=True, eq=False)
class SampleSource:
    """One slide ready for sampling.

    ``attributes`` holds the manifest columns the sampler may balance on (``grade``,
    ``split``, ...); ``grid`` the slide's patch grid, of which only labelled patches
    (label 0 or 1) are ever drawn."""

    slide_id: str
    slide_path: Path
    grid: PatchGrid
    mpp: float | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def class_indices(self, label: int) -> np.ndarray:
        """Indices into ``grid.coords`` of the patches labelled ``label``."""
        return np.flatnonzero(np.asarray(self.grid.labels) == label)


@dataclass(frozen=True)
class BatchDraw:
    """One batch of draws as arrays: indices into the sampler's ``sources``, level-0
    top-left coordinates ``(n, 2)``, labels, and one augmentation seed per patch."""

    slide_index: np.ndarray
    coords: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray


def build_sources(
    records: Iterable[SlideRecord],
    *,
    magnification: float = 10.0,
    patch_size: int = 256,
    tissue_threshold: float = 0.25,
    tumour_threshold: float = 0.25,
    tissue_magnification: float = 1.25,
    progress: bool = True,
) -> list[SampleSource]:
    """Open each record's slide, detect its tissue, load its annotation and build its
    patch grid.  Slides without any labelled patch (no tissue, or no annotation) are left
    out and named in one warning on the ``h2g.sampling`` logger."""
    from h2g.patches import build_patch_grid, load_annotation
    from h2g.tissue import detect_tissue
    from h2g.wsi import open_slide

    records = list(records)
    sources: list[SampleSource] = []
    left_out: list[str] = []
    for record in tqdm(records, desc="patch grids", unit="slide", disable=not progress):
        slide = open_slide(record.slide_path, record.mpp)
        tissue = detect_tissue(slide, magnification=tissue_magnification)
        annotation = None
        if record.annotation_path is not None:
            annotation = load_annotation(record.annotation_path, slide)
        grid = build_patch_grid(
            slide,
            tissue,
            annotation,
            magnification=magnification,
            patch_size=patch_size,
            tissue_threshold=tissue_threshold,
            tumour_threshold=tumour_threshold,
        )
        if not np.any(np.asarray(grid.labels) >= 0):
            left_out.append(f"{record.slide_id} ({_why_unusable(grid, annotation)})")
            continue
        attributes = {
            f.name: getattr(record, f.name)
            for f in dataclasses.fields(record)
            if f.name not in _LOCATION_FIELDS
        }
        sources.append(
            SampleSource(record.slide_id, Path(record.slide_path), grid, record.mpp, attributes)
        )
    if left_out:
        log.warning(
            "left out %d slide(s) with no usable patches: %s", len(left_out), ", ".join(left_out)
        )
    return sources


class HierarchicalSampler:
    """A tree of uniform choices over ``sources``.

    ``stages`` is a tuple of source attribute names (balanced in that order, each value
    uniformly among the values that have slides) followed by ``"slide"``, optionally
    ``"class"`` (a class uniformly among those the chosen slide has patches of) and
    ``"patch"``.  Without ``"class"`` a patch is drawn uniformly among all the slide's
    labelled patches.

    Raises :class:`~h2g.errors.SamplerError` when there are no sources, a stage names an
    attribute a source lacks, a source has no labelled patch, or no source has patches
    of some class (the class stage could never be satisfied for it)."""

    def __init__(
        self,
        sources: Sequence[SampleSource],
        stages: Sequence[str] = DEFAULT_STAGES,
        seed: int = 0,
    ):
        self.sources = list(sources)
        self.stages = tuple(stages)
        self.seed = int(seed)
        if self.seed < 0:
            raise ConfigError(f"sampler seed must be >= 0, got {seed}")
        self._attributes, self._by_class = _parse_stages(self.stages)
        _check_sources(self.sources, self._attributes)
        self._levels, self._slide_of, self._coords, self._labels = self._build_tree()

    def _leaves(self) -> list[tuple[tuple, np.ndarray]]:
        """``(path of choices, patch indices)`` per leaf, in source order."""
        leaves = []
        for i, source in enumerate(self.sources):
            prefix = tuple(source.attributes[name] for name in self._attributes) + (i,)
            if self._by_class:
                for label in range(NUM_CLASSES):
                    indices = source.class_indices(label)
                    if len(indices):
                        leaves.append((prefix + (label,), indices))
            else:
                labels = np.asarray(source.grid.labels)
                leaves.append((prefix, np.flatnonzero(labels >= 0)))
        return leaves

    def _build_tree(self):
        """Flatten the tree into levels of ``(start, count)`` arrays: node ``j`` of a
        level has children ``start[j] .. start[j] + count[j] - 1`` in the next level; the
        last level points into the flat patch table (slide index, coordinates, label)."""
        leaves = dict(self._leaves())
        depth = len(next(iter(leaves)))
        levels = []
        nodes: list[tuple] = [()]  # the root: the empty path
        for d in range(depth):
            children = list(dict.fromkeys(path[: d + 1] for path in leaves))
            start, count, nodes = _group_children(nodes, children)
            levels.append((start, count))
        # the patch level: each leaf's patches, concatenated in leaf-node order
        sizes = np.array([len(leaves[path]) for path in nodes], np.int64)
        levels.append((np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes))
        slide_pos = len(self._attributes)
        slide_of, coords, labels = [], [], []
        for path in nodes:
            grid = self.sources[path[slide_pos]].grid
            indices = leaves[path]
            slide_of.append(np.full(len(indices), path[slide_pos], np.int32))
            coords.append(np.asarray(grid.coords, np.int64)[indices])
            labels.append(np.asarray(grid.labels, np.int32)[indices])
        return levels, np.concatenate(slide_of), np.concatenate(coords), np.concatenate(labels)

    def _draw_arrays(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Walk the tree ``n`` times at once; returns rows of the flat patch table and one
        augmentation seed per draw."""
        node = np.zeros(n, np.int64)
        for start, count in self._levels:
            node = start[node] + rng.integers(0, count[node])
        seeds = rng.integers(0, _SEED_LIMIT, size=n, dtype=np.int64)
        return node, seeds

    def draw(self, n: int, rng: np.random.Generator) -> list[Draw]:
        """``n`` draws ``(slide_id, x, y, label)`` from ``rng``."""
        rows, _ = self._draw_arrays(n, rng)
        return self._as_tuples(rows)

    def batch_arrays(self, batch_index: int, batch_size: int, stream: int = TRAIN_STREAM) -> BatchDraw:
        """Batch ``batch_index`` of ``stream`` as arrays (see :class:`BatchDraw`)."""
        rows, seeds = self._draw_arrays(batch_size, self.batch_rng(batch_index, stream))
        return BatchDraw(self._slide_of[rows], self._coords[rows], self._labels[rows], seeds)

    def draw_batch(self, batch_index: int, batch_size: int, stream: int = TRAIN_STREAM) -> list[Draw]:
        """Batch ``batch_index`` of ``stream`` as ``(slide_id, x, y, label)`` tuples; the
        same arguments always give the same batch."""
        rows, _ = self._draw_arrays(batch_size, self.batch_rng(batch_index, stream))
        return self._as_tuples(rows)

    def batch_rng(self, batch_index: int, stream: int = TRAIN_STREAM) -> np.random.Generator:
        """The generator of one batch, seeded from ``(seed, stream, batch_index)``."""
        if batch_index < 0 or stream < 0:
            raise ConfigError(f"batch index and stream must be >= 0, got {batch_index}, {stream}")
        return np.random.default_rng([self.seed, int(stream), int(batch_index)])

    def _as_tuples(self, rows: np.ndarray) -> list[Draw]:
        return [
            (self.sources[s].slide_id, int(x), int(y), int(label))
            for s, (x, y), label in zip(self._slide_of[rows], self._coords[rows], self._labels[rows])
        ]


def _why_unusable(grid: PatchGrid, annotation) -> str:
    if len(grid.labels) == 0:
        return "no tissue patches"
    if annotation is None:
        return "no annotation"
    return "every tissue patch is discarded as partly tumour"


def _parse_stages(stages: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """Split ``stages`` into the attribute stages and whether the class stage is on."""
    for tail, by_class in ((("slide", "class", "patch"), True), (("slide", "patch"), False)):
        attributes = stages[: len(stages) - len(tail)]
        if stages[len(attributes):] == tail and not set(attributes) & {"slide", "class", "patch"}:
            return attributes, by_class
    raise SamplerError(
        f"sampler stages {stages!r} must be attribute names followed by "
        "('slide', 'class', 'patch') or ('slide', 'patch')"
    )


def _split_name(sources: Sequence[SampleSource]) -> str:
    splits = sorted({str(s.attributes["split"]) for s in sources if "split" in s.attributes})
    return "/".join(splits) if splits else "(no split given)"


def _check_sources(sources: list[SampleSource], attributes: tuple[str, ...]) -> None:
    if not sources:
        raise SamplerError("no slides to sample from: the split is empty or every slide was left out")
    for name in attributes:
        lacking = [s.slide_id for s in sources if name not in s.attributes]
        if lacking:
            known = sorted({k for s in sources for k in s.attributes})
            raise SamplerError(
                f"unknown sampler stage {name!r}: slide(s) {', '.join(lacking[:5])} have no such "
                f"attribute (known: {', '.join(known) or 'none'})"
            )
    empty = [s.slide_id for s in sources if not np.any(np.asarray(s.grid.labels) >= 0)]
    if empty:
        raise SamplerError(f"slide(s) {', '.join(empty)} have no labelled patches")
    for label, name in enumerate(CLASS_NAMES):
        if not any(len(s.class_indices(label)) for s in sources):
            raise SamplerError(
                f"split {_split_name(sources)}: no slide has {name} patches "
                f"(class {label}); the sampler cannot balance classes"
            )


def _group_children(parents: list[tuple], children: list[tuple]):
    """Order ``children`` (paths one longer than their parent's) by parent, keeping
    first-appearance order within a parent; returns each parent's ``(start, count)``
    into the ordered children, and the ordered children."""
    index = {p: j for j, p in enumerate(parents)}
    owner = np.array([index[c[:-1]] for c in children], np.int64)
    order = np.argsort(owner, kind="stable")
    count = np.bincount(owner, minlength=len(parents)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return start, count, [children[k] for k in order]


def read_patch(
    source: SampleSource,
    x: int,
    y: int,
    *,
    magnification: float = 10.0,
    patch_size: int = 256,
) -> np.ndarray:
    """The ``(patch_size, patch_size, 3)`` uint8 patch of ``source`` at level-0 ``(x, y)``
    and ``magnification``, through the shared handle of :func:`h2g.wsi.open_slide`."""
    from h2g.wsi import open_slide

    slide = open_slide(source.slide_path, source.mpp)
    return slide.read_region((x, y), (patch_size, patch_size), magnification)


def reader_pool(readers: int) -> ThreadPoolExecutor:
    """The process's pool of ``readers`` patch-reading threads, made on first use and
    shared by every dataset asking for that many.  Its threads are ordinary Python
    threads that live as long as the process, so thread-local state (an augmentation
    pipeline cached per thread) survives from one patch to the next, which it does not
    in the short-lived Python thread states of ``tf.numpy_function`` calls."""
    with _POOLS_LOCK:
        pool = _POOLS.get(readers)
        if pool is None:
            pool = _POOLS[readers] = ThreadPoolExecutor(readers, thread_name_prefix=f"h2g-reader{readers}")
        return pool


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it); the
    default number of reader threads."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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
