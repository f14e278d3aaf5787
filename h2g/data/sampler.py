"""The hierarchical patch sampler of the paper (Section 2.3), streamed from raw slides.

Patches are never stored.  Each one is drawn by a tree of uniform choices, by default
(1) a histological grade among the grades that have slides, (2) a slide of that grade,
(3) a class among the classes that slide has patches of, (4) a patch of that class, and
then read from the whole-slide image at 10x with OpenSlide while training runs.

Classes come from a :class:`~h2g.io.classes.ClassTable` (default: the patch grids'
table, binary tumour / non-tumour for H2G-Net), so the class stage works for any number
of classes; it draws uniformly among the classes the slide has, or with
``class_weights`` (e.g. m-UNet's 2:1:1 tumour:normal:other) renormalised over the
classes the slide has.  Without weights the draws are those of the binary-only sampler,
number for number.  The grade is just one attribute stage: a manifest without grades
balances with ``("slide", "class", "patch")`` or on any other manifest column.

- :class:`SampleSource` is one slide ready for sampling: its id, path, mpp override,
  manifest attributes (grade, split, ...) and :class:`~h2g.tiling.grid.PatchGrid`.
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
one OpenSlide handle per slide through :func:`h2g.io.slide.open_slide`'s module-level cache.
TensorFlow is imported by :func:`patch_dataset` only; the rest works without it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from h2g.core.errors import ConfigError, SamplerError
from h2g.io.classes import BINARY, ClassTable

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only

    from h2g.io.manifest import SlideRecord
    from h2g.tiling.grid import PatchGrid

log = logging.getLogger(__name__)

# The binary default, for modules that still assume it; use HierarchicalSampler.n_classes.
NUM_CLASSES = BINARY.n_classes  # classes of a sampler stand-in without n_classes (tumour masks)
DEFAULT_STAGES = ("grade", "slide", "class", "patch")
TRAIN_STREAM = 0  # seed streams: training and validation batches never share numbers
VALIDATION_STREAM = 1

Draw = tuple[str, int, int, int]  # (slide_id, x, y, label)
Augment = Callable[[np.ndarray, int], np.ndarray]

# Record fields that are manifest attributes the sampler may balance on.
_ATTRIBUTE_FIELDS = ("grade", "split")
_SEED_LIMIT = 2**31  # augmentation seeds lie in [0, 2**31)


@dataclass(frozen=True, eq=False)
class SampleSource:
    """One slide ready for sampling.

    ``attributes`` holds the manifest columns the sampler may balance on (``grade``,
    ``split``, extra columns such as ``stain``); ``grid`` the slide's patch grid, of
    which only labelled patches (label >= 0, a class index) are ever drawn."""

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
    saturation_threshold: int = 20,
    classes: ClassTable | None = None,
    annotation_downsample: float = 4.0,
    min_labelled: float = 0.01,
    progress: bool = True,
) -> list[SampleSource]:
    """Open each record's slide, detect its tissue (at ``tissue_magnification``, with
    ``saturation_threshold``), load its annotation (at ``annotation_downsample``, values
    read through ``classes``, default binary) and build its patch grid.

    Slides without any labelled patch (no tissue, no annotation, or every tissue patch
    discarded) are left out and named in one warning on this module's logger; when
    that leaves no slide at all, a :class:`SamplerError` names the split and each slide
    with its reason.  A source's ``attributes`` are its record's grade (when given),
    split and extra manifest columns."""
    from h2g.io.annotation import load_annotation
    from h2g.io.slide import open_slide
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import detect_tissue

    records = list(records)
    sources: list[SampleSource] = []
    left_out: list[str] = []
    for record in tqdm(records, desc="patch grids", unit="slide", disable=not progress):
        slide = open_slide(record.slide_path, record.mpp)
        tissue = detect_tissue(slide, magnification=tissue_magnification,
                               saturation_threshold=saturation_threshold)
        annotation = None
        if record.annotation_path is not None:
            annotation = load_annotation(record.annotation_path, slide,
                                         downsample=annotation_downsample, classes=classes)
        grid = build_patch_grid(
            slide,
            tissue,
            annotation,
            magnification=magnification,
            patch_size=patch_size,
            tissue_threshold=tissue_threshold,
            tumour_threshold=tumour_threshold,
            min_labelled=min_labelled,
        )
        if not np.any(np.asarray(grid.labels) >= 0):
            left_out.append(f"{record.slide_id} ({_why_unusable(grid, annotation)})")
            continue
        sources.append(
            SampleSource(record.slide_id, Path(record.slide_path), grid, record.mpp,
                         record_attributes(record))
        )
    if records and not sources:
        splits = "/".join(sorted({str(r.split) for r in records})) or "(no split given)"
        raise SamplerError(
            f"split {splits}: no slide has labelled patches to train on: {', '.join(left_out)}; "
            "training and validation slides need annotations with tissue")
    if left_out:
        log.warning(
            "left out %d slide(s) with no usable patches: %s", len(left_out), ", ".join(left_out)
        )
    return sources


def record_attributes(record) -> dict[str, Any]:
    """The attributes of a manifest record the sampler may balance on: ``grade`` (unless
    the manifest gives none), ``split`` and the record's extra columns."""
    attributes = {name: getattr(record, name) for name in _ATTRIBUTE_FIELDS
                  if getattr(record, name, None) is not None}
    attributes.update(getattr(record, "attributes", None) or {})
    return attributes


class HierarchicalSampler:
    """A tree of uniform choices over ``sources``.

    ``stages`` is a tuple of source attribute names (balanced in that order, each value
    uniformly among the values that have slides) followed by ``"slide"``, optionally
    ``"class"`` (a class among those the chosen slide has patches of) and ``"patch"``.
    Without ``"class"`` a patch is drawn uniformly among all the slide's labelled
    patches.

    ``classes`` is the :class:`~h2g.io.classes.ClassTable` of the patch labels (default:
    the sources' grids' table, else binary).  The class stage is uniform, or follows
    ``class_weights`` (by class name, or a sequence in class order; non-negative)
    renormalised over the classes the chosen slide has.

    Raises :class:`~h2g.core.errors.SamplerError` when there are no sources, a stage names an
    attribute a source lacks, a source has no labelled patch or a label outside the
    class table, no source has patches of some class the class stage needs, or a slide
    has only classes of weight 0."""

    def __init__(
        self,
        sources: Sequence[SampleSource],
        stages: Sequence[str] = DEFAULT_STAGES,
        seed: int = 0,
        classes: ClassTable | None = None,
        class_weights: Mapping[str, float] | Sequence[float] | None = None,
    ):
        self.sources = list(sources)
        self.stages = tuple(stages)
        self.seed = int(seed)
        if self.seed < 0:
            raise ConfigError(f"sampler seed must be >= 0, got {seed}")
        self._attributes, self._by_class = _parse_stages(self.stages)
        self.classes = _class_table(self.sources, classes)
        self.class_weights = _class_weights(self.classes, class_weights, self._by_class)
        _check_sources(self.sources, self._attributes, self.classes, self.class_weights)
        self._levels, self._slide_of, self._coords, self._labels = self._build_tree()

    @property
    def n_classes(self) -> int:
        """The number of classes (the width of a one-hot label)."""
        return self.classes.n_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.names

    def _leaves(self) -> list[tuple[tuple, np.ndarray]]:
        """``(path of choices, patch indices)`` per leaf, in source order."""
        leaves = []
        for i, source in enumerate(self.sources):
            prefix = tuple(source.attributes[name] for name in self._attributes) + (i,)
            if self._by_class:
                for label in range(self.n_classes):
                    indices = source.class_indices(label)
                    if len(indices):
                        leaves.append((prefix + (label,), indices))
            else:
                labels = np.asarray(source.grid.labels)
                leaves.append((prefix, np.flatnonzero(labels >= 0)))
        return leaves

    def _build_tree(self):
        """Flatten the tree into levels of ``(start, count, cdf)`` arrays: node ``j`` of a
        level has children ``start[j] .. start[j] + count[j] - 1`` in the next level
        (``cdf`` is ``None`` for a uniform choice, else see :func:`_weighted_cdf`); the
        last level points into the flat patch table (slide index, coordinates, label)."""
        leaves = dict(self._leaves())
        depth = len(next(iter(leaves)))
        class_level = len(self._attributes) + 1 if self._by_class else None
        levels = []
        nodes: list[tuple] = [()]  # the root: the empty path
        for d in range(depth):
            children = list(dict.fromkeys(path[: d + 1] for path in leaves))
            start, count, nodes = _group_children(nodes, children)
            cdf = None
            if d == class_level and self.class_weights is not None:
                cdf = _weighted_cdf(start, count, [self.class_weights[path[-1]] for path in nodes])
            levels.append((start, count, cdf))
        # the patch level: each leaf's patches, concatenated in leaf-node order
        sizes = np.array([len(leaves[path]) for path in nodes], np.int64)
        levels.append((np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes, None))
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
        for start, count, cdf in self._levels:
            if cdf is None:
                node = start[node] + rng.integers(0, count[node])
            else:  # weighted: the first child whose cumulative weight exceeds node + u
                chosen = np.searchsorted(cdf, node + rng.random(n), side="right")
                node = np.clip(chosen, start[node], start[node] + count[node] - 1)
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
    if getattr(grid, "classes", None) is not None and not grid.classes.is_binary:
        return "every tissue patch is discarded as too little annotated"
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


def _class_table(sources: Sequence[SampleSource], classes: ClassTable | None) -> ClassTable:
    """``classes``, else the one table of the sources' grids (binary when they carry none)."""
    if classes is not None:
        return classes
    tables = {getattr(s.grid, "classes", None) for s in sources} - {None}
    if len(tables) > 1:
        raise SamplerError("the slides' patch grids use different class tables: "
                           + " / ".join(", ".join(t.names) for t in tables))
    return tables.pop() if tables else BINARY


def _class_weights(classes: ClassTable, weights, by_class: bool) -> np.ndarray | None:
    """Per-class weights in class order, or ``None`` (uniform)."""
    if weights is None:
        return None
    if not by_class:
        raise ConfigError("class weights need the sampler's 'class' stage")
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in classes.names]
        missing = [n for n in classes.names if n not in weights]
        if unknown or missing:
            raise ConfigError(
                f"class weights {dict(weights)} do not match the classes {', '.join(classes.names)}"
                + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else "")
                + (f"; missing: {', '.join(missing)}" if missing else ""))
        weights = [weights[n] for n in classes.names]
    values = np.asarray(list(weights), dtype=float)
    if values.shape != (classes.n_classes,):
        raise ConfigError(f"{len(values)} class weight(s) for {classes.n_classes} classes "
                          f"({', '.join(classes.names)})")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or not values.sum() > 0:
        raise ConfigError(f"class weights must be finite, >= 0 and not all 0, got {values.tolist()}")
    return values


def _weighted_cdf(start: np.ndarray, count: np.ndarray, weights: list[float]) -> np.ndarray:
    """Cumulative weights of each parent's children, offset by the parent's index, so that
    one ``searchsorted`` of ``parent + u`` (u uniform in [0, 1)) picks a child of that
    parent with probability proportional to its weight; a parent's last child ends at
    exactly ``parent + 1``."""
    weights = np.asarray(weights, dtype=float)
    cdf = np.empty(len(weights))
    for parent, (first, n) in enumerate(zip(start, count)):
        block = np.cumsum(weights[first:first + n])
        cdf[first:first + n] = parent + block / block[-1]
        cdf[first + n - 1] = parent + 1
    return cdf


def _check_sources(sources: list[SampleSource], attributes: tuple[str, ...],
                   classes: ClassTable, weights: np.ndarray | None) -> None:
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
    beyond = [s.slide_id for s in sources if np.any(np.asarray(s.grid.labels) >= classes.n_classes)]
    if beyond:
        raise SamplerError(
            f"slide(s) {', '.join(beyond)} have patch labels beyond the {classes.n_classes} "
            f"classes of the class table ({', '.join(classes.names)})")
    for label, name in enumerate(classes.names):
        if weights is not None and weights[label] == 0:
            continue
        if not any(len(s.class_indices(label)) for s in sources):
            raise SamplerError(
                f"split {_split_name(sources)}: no slide has {name} patches "
                f"(class {label}); the sampler cannot balance classes"
            )
    if weights is not None:
        unweighted = [s.slide_id for s in sources
                      if not any(weights[c] > 0 and len(s.class_indices(c)) for c in range(classes.n_classes))]
        if unweighted:
            raise SamplerError(f"slide(s) {', '.join(unweighted)} have patches only of classes of "
                               f"weight 0 (class weights {weights.tolist()})")


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
