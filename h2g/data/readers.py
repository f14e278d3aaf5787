"""Reading samples from slides: one pool of reader threads for training and inference.

- :func:`reader_pool` is the process's pool of reader threads.  Training batches
  (:func:`h2g.data.dataset.read_batch` inside ``tf.data``) and inference
  (:class:`h2g.inference.heatmap.PatchReader`) both read on it, so a process never runs
  more reader threads than it asked for, and thread-local state (an augmentation
  pipeline cached per thread) lives as long as the process.
- :class:`ReadAhead` maps a function over items on the pool with at most ``depth``
  results read ahead of the consumer: bounded memory, reading overlapped with whatever
  the consumer does, results in order, a reader's error re-raised in the consumer.
- :func:`read_sample` reads a sample's named views (:mod:`h2g.data.views`) around a
  level-0 centre; :func:`read_label_view` the matching pixel target: the annotation's
  label map resampled (nearest) onto one view's pixel grid, :data:`IGNORE` where there
  is no label.  :func:`read_patch` is H2G-Net's patch: one "white"-padded view.

OpenSlide decoding, PIL resizing and OpenCV augmentation release the GIL, so reader
threads run in parallel with each other and with TensorFlow.  TensorFlow-free.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from h2g.core.errors import ConfigError
from h2g.data.views import View, read_view, read_views
from h2g.io.classes import IGNORE  # label of unlabelled pixels in pixel targets

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    from h2g.data.sampler import SampleSource
    from h2g.io.annotation import Annotation
    from h2g.io.slide import Slide

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[int, ThreadPoolExecutor] = {}  # reader pools by size (see reader_pool)
_POOLS_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def reader_pool(readers: int) -> ThreadPoolExecutor:
    """The process's pool of ``readers`` reading threads, made on first use and shared
    by every dataset and inference reader asking for that many.  Its threads are
    ordinary Python threads that live as long as the process, so thread-local state (an
    augmentation pipeline cached per thread) survives from one patch to the next, which
    it does not in the short-lived Python thread states of ``tf.numpy_function`` calls.

    A task running on the pool must not wait for other tasks of the same pool (it could
    wait for itself)."""
    if int(readers) < 1:
        raise ConfigError(f"readers must be >= 1, got {readers}")
    with _POOLS_LOCK:
        pool = _POOLS.get(readers)
        if pool is None:
            pool = _POOLS[readers] = ThreadPoolExecutor(readers, thread_name_prefix=f"h2g-reader{readers}")
        return pool


class ReadAhead(Iterator[R]):
    """Iterate ``fn(item)`` for ``items`` in order, computed on :func:`reader_pool`
    (``readers``) with at most ``depth`` results submitted ahead of the consumer (so
    at most ``depth`` finished results wait in memory, plus the one the consumer holds).

    A reader's exception is re-raised in the consumer when its result is due (the
    readers still pending are cancelled).  :attr:`busy_seconds` sums the time the
    readers spent in ``fn``.  :meth:`close` (also on ``with`` exit) cancels what has not
    started and waits for what has, so nothing reads from a slide after it returns."""

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], *, readers: int, depth: int):
        if depth < 1:
            raise ConfigError(f"depth must be >= 1, got {depth}")
        self._fn, self._items = fn, iter(items)
        self._pool = reader_pool(readers)
        self._depth = depth
        self._pending: deque[Future] = deque()
        self._lock = threading.Lock()
        self.busy_seconds = 0.0
        self._closed = False
        self._fill()

    def _timed(self, item: T) -> R:
        t0 = time.perf_counter()
        try:
            return self._fn(item)
        finally:
            with self._lock:
                self.busy_seconds += time.perf_counter() - t0

    def _fill(self) -> None:
        while not self._closed and len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._pending.append(self._pool.submit(self._timed, item))

    @property
    def pending(self) -> int:
        """Results submitted and not yet handed to the consumer (at most ``depth``)."""
        return len(self._pending)

    def __iter__(self) -> "ReadAhead[R]":
        return self

    def __next__(self) -> R:
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        try:
            result = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return result

    def close(self) -> None:
        self._closed = True
        while self._pending:
            future = self._pending.popleft()
            if not future.cancel():
                try:
                    future.result()
                except BaseException:  # noqa: S110 - the consumer has stopped listening
                    pass

    def __enter__(self) -> "ReadAhead[R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slide_of(source: "SampleSource | Slide") -> "Slide":
    """The :class:`~h2g.io.slide.Slide` of ``source``: itself when it is one (anything
    with ``read_region``), else the shared handle of :func:`h2g.io.slide.open_slide`
    for a :class:`~h2g.data.sampler.SampleSource`'s path and mpp override."""
    if hasattr(source, "read_region"):
        return source
    from h2g.io.slide import open_slide

    return open_slide(source.slide_path, source.mpp)


def read_sample(source: "SampleSource | Slide", centre: tuple[float, float],
                views: Sequence[View]) -> dict[str, np.ndarray]:
    """``{view name: (size, size, 3) uint8}`` of every view around the level-0
    ``centre`` of ``source`` (a slide or a :class:`~h2g.data.sampler.SampleSource`)."""
    return read_views(slide_of(source), centre, views)


def read_patch(
    source: "SampleSource | Slide",
    x: int,
    y: int,
    *,
    magnification: float = 10.0,
    patch_size: int = 256,
) -> np.ndarray:
    """The ``(patch_size, patch_size, 3)`` uint8 patch of ``source`` whose top-left
    corner is level-0 ``(x, y)``, at ``magnification``: H2G-Net's patch view (white
    beyond the slide, like OpenSlide) centred on the patch's centre."""
    view = View("image", magnification, patch_size, "white")
    slide = slide_of(source)
    half = view.extent(slide) / 2
    return read_view(slide, (x + half, y + half), view)


def label_map(annotation: "Annotation") -> np.ndarray:
    """The annotation's label map as uint8 class indices: ``annotation.labels`` when it
    has them (multi-class; :data:`IGNORE` = unlabelled), else the binary tumour mask as
    0 (non-tumour) / 1 (tumour)."""
    labels = getattr(annotation, "labels", None)
    if labels is not None:
        return np.asarray(labels, np.uint8)
    return np.asarray(annotation.mask).astype(np.uint8)


def read_label_view(annotation: "Annotation", source: "SampleSource | Slide",
                    centre: tuple[float, float], view: View) -> np.ndarray:
    """``(size, size)`` uint8 class indices of ``annotation`` on ``view``'s pixel grid
    around level-0 ``centre``: each output pixel takes the label under its centre
    (nearest neighbour of a raster mask, the polygon containing it for polygons; labels
    are never blended), read for this view only (:meth:`Annotation.sample`).  Pixels
    whose centre lies outside the label map, or outside the slide (where the view's
    padding shows reflected or white context that is not annotated), are :data:`IGNORE`."""
    slide = slide_of(source)
    step = slide.downsample_for(view.magnification)  # level-0 px per output px
    x0, y0 = view.top_left(slide, centre)
    size = int(view.size)
    width, height = slide.dimensions
    centres = np.arange(size) + 0.5
    if hasattr(annotation, "sample"):
        out = annotation.sample(x0, y0, step, step, size, size)
        xs, ys = x0 + centres * step, y0 + centres * step
        out[:, (xs < 0) | (xs >= width)] = IGNORE  # the slide's own extent
        out[(ys < 0) | (ys >= height), :] = IGNORE
        return out
    labels = label_map(annotation)  # a stand-in with a whole label map

    def index(start: float, limit: int, n_labels: int) -> np.ndarray:
        level0 = start + centres * step
        i = np.floor(level0 / float(annotation.downsample)).astype(np.int64)
        i[(level0 < 0) | (level0 >= limit) | (i >= n_labels)] = -1
        return i

    cols = index(x0, width, labels.shape[1])
    rows = index(y0, height, labels.shape[0])
    out = np.full((size, size), IGNORE, np.uint8)
    r_ok, c_ok = rows >= 0, cols >= 0
    if r_ok.any() and c_ok.any():
        out[np.ix_(r_ok, c_ok)] = labels[np.ix_(rows[r_ok], cols[c_ok])]
    return out


def grid_centre(grid, slide: "Slide", x: float, y: float) -> tuple[float, float]:
    """Level-0 centre of the patch-grid cell whose top-left corner is ``(x, y)``: the
    cell spans ``grid.patch_size`` px at ``grid.magnification``."""
    half = grid.patch_size * slide.downsample_for(grid.magnification) / 2
    return x + half, y + half


def sampled_label_counts(sampler, view: View, annotations, *, n_batches: int, batch_size: int,
                         n_classes: int, stream: int = 0) -> np.ndarray:
    """Pixels per class (int64, ``n_classes``) of ``view``'s label maps over batches
    ``0 .. n_batches - 1`` of ``stream`` as ``sampler`` draws them (the pixels training
    sees, before augmentation), :data:`IGNORE` left out; ``annotations`` by slide id.
    Only label maps are read, no slide pixels."""
    from h2g.io.classes import IGNORE

    counts = np.zeros(n_classes, np.int64)
    for index in range(n_batches):
        batch = sampler.batch_arrays(index, batch_size, stream)
        for slide_index, (x, y) in zip(batch.slide_index, batch.coords):
            source = sampler.sources[slide_index]
            slide = slide_of(source)
            centre = grid_centre(source.grid, slide, float(x), float(y))
            labels = read_label_view(annotations[source.slide_id], slide, centre, view)
            counts += np.bincount(labels[labels != IGNORE].ravel(), minlength=n_classes)[:n_classes]
    return counts
