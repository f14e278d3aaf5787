"""Grids of non-overlapping patches over a slide's tissue, labelled from an annotation.

The grid cuts the whole slide into ``patch_size`` x ``patch_size`` patches at
``magnification`` (``step`` level-0 pixels a side), starting at (0, 0); the last row and
column may run past the slide's edge (those parts read as white glass).  For each patch,
the fraction of its footprint covered by tissue is the exact area average of the tissue
mask over the footprint (every mask pixel counts with the area it shares with the patch,
and the part of a footprint beyond the mask counts as neither); the fraction covered by
each class comes from the annotation (:meth:`h2g.io.annotation.Annotation.class_fractions`:
the same exact area average for raster masks, the exact area of the polygons in the patch
for polygon annotations), so no label map of the slide is made.

Rules (the paper's, with its values as defaults):

- keep a patch only if its tissue fraction is > ``tissue_threshold`` (else "background");
- with a binary annotation (:attr:`h2g.io.classes.ClassTable.is_binary`: H2G-Net's
  tumour masks): tumour fraction > ``tumour_threshold`` -> tumour (1); exactly 0 ->
  non-tumour (0); in between -> "discarded";
- with a multi-class (or partial, with ignored pixels) annotation: a patch whose
  labelled (not ignored) fraction is > ``min_labelled`` gets the class of its majority
  labelled pixel (the largest class fraction; ties go to the lower class index); the
  others are "discarded".  ``tumour_threshold`` plays no part;
- without an annotation, kept patches get label -1.

``counts`` holds the number of grid cells per outcome: for a binary annotation (or none)
``tumour``, ``non_tumour``, ``discarded`` and ``background``; for a multi-class one, one
count per class name, ``discarded`` and ``background``.  Annotations are read by
:func:`h2g.io.annotation.load_annotation` (raster masks or polygons).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from h2g.io.annotation import Annotation
from h2g.io.areas import cell_averages
from h2g.io.classes import BINARY, ClassTable
from h2g.tiling.tissue import TissueMask, detect_tissue


@dataclass
class PatchGrid:
    """Kept patches of a slide: level-0 top-left ``coords`` (N, 2) as (x, y), ``labels``
    (N,) (class indices of ``classes``: for the binary default 1 tumour, 0 non-tumour;
    -1 unlabelled), and ``counts`` of grid cells per outcome (see the module doc)."""

    coords: np.ndarray
    labels: np.ndarray
    magnification: float
    patch_size: int
    step: int
    counts: dict = field(default_factory=dict)
    grid_shape: tuple[int, int] = (0, 0)
    classes: ClassTable = BINARY

    def indices_of(self, label: int) -> np.ndarray:
        """Indices into ``coords``/``labels`` of the patches labelled ``label``."""
        return np.flatnonzero(self.labels == label)


def area_fractions(mask: np.ndarray, downsample: float, step: float,
                   grid_shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell (``step`` level-0 px a side, ``grid_shape`` = (rows,
    cols)) covered by ``mask`` (``downsample`` level-0 px per mask px): the exact area
    average (:func:`h2g.io.areas.cell_averages`)."""
    return cell_averages(mask, None, downsample, step, grid_shape, [None])[0]


def class_area_fractions(labels: np.ndarray, n_classes: int, downsample: float, step: float,
                         grid_shape: tuple[int, int]) -> np.ndarray:
    """``(n_classes, rows, cols)``: the fraction of each grid cell covered by each class
    of the label map ``labels`` (as :func:`area_fractions` of ``labels == c``, without a
    full-size indicator image per class)."""
    return cell_averages(labels, None, downsample, step, grid_shape, list(range(n_classes)))


def build_patch_grid(
    slide,
    tissue: TissueMask | None = None,
    annotation: Annotation | None = None,
    magnification: float = 10.0,
    patch_size: int = 256,
    tissue_threshold: float = 0.25,
    tumour_threshold: float = 0.25,
    min_labelled: float = 0.01,
) -> PatchGrid:
    """The labelled patch grid of ``slide`` (see the module doc for the rules).
    ``tissue`` defaults to :func:`h2g.tiling.tissue.detect_tissue` of the slide;
    ``min_labelled`` is the labelled fraction a multi-class patch needs."""
    if tissue is None:
        tissue = detect_tissue(slide)
    step = int(round(patch_size * slide.downsample_for(magnification)))
    width, height = slide.dimensions
    grid_shape = (-(-height // step), -(-width // step))
    tissue_frac = area_fractions(tissue.mask, tissue.downsample, step, grid_shape).ravel()
    kept = tissue_frac > tissue_threshold + 1e-9
    labels = np.full(kept.size, -1, np.int8)
    classes = BINARY if annotation is None else annotation.classes
    counts = {"tumour": 0, "non_tumour": 0, "discarded": 0,
              "background": int((~kept).sum())}
    if annotation is not None and classes.is_binary:
        tumour_frac = annotation.class_fractions(step, grid_shape, patch_size,
                                                 classes=[classes.tumour_index])[0].ravel()
        tumour = tumour_frac > tumour_threshold + 1e-9
        clean = tumour_frac == 0
        labels[tumour] = 1
        labels[clean] = 0
        discarded = kept & ~tumour & ~clean
        counts.update(tumour=int((kept & tumour).sum()), non_tumour=int((kept & clean).sum()),
                      discarded=int(discarded.sum()))
        kept &= ~discarded
    elif annotation is not None:
        fractions = annotation.class_fractions(step, grid_shape, patch_size)
        fractions = fractions.reshape(classes.n_classes, -1)
        labelled = fractions.sum(axis=0) > min_labelled + 1e-9
        majority = np.argmax(fractions, axis=0)
        labels[labelled] = majority[labelled]
        discarded = kept & ~labelled
        counts = {name: int((kept & labelled & (majority == c)).sum())
                  for c, name in enumerate(classes.names)}
        counts.update(discarded=int(discarded.sum()), background=int((~kept).sum()))
        kept &= ~discarded
    index = np.flatnonzero(kept)
    row, col = np.divmod(index, grid_shape[1])
    coords = np.stack([col * step, row * step], axis=1).astype(np.int64)
    return PatchGrid(coords=coords, labels=labels[index], magnification=float(magnification),
                     patch_size=int(patch_size), step=step, counts=counts, grid_shape=grid_shape,
                     classes=classes)
