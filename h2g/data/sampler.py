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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from h2g.core.errors import ConfigError, SamplerError

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only

    from h2g.io.manifest import SlideRecord
    from h2g.tiling.grid import PatchGrid

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
    from h2g.tiling.grid import build_patch_grid
    from h2g.io.annotation import load_annotation
    from h2g.tiling.tissue import detect_tissue
    from h2g.io.slide import open_slide

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
