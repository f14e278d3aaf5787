"""What a per-region zoom decision can gain: RAZN's oracle policy.

RAZN (Dong et al.) decides per region whether to segment it at the coarse scale or to
zoom in.  Given a coarse and a fine prediction of the same slide on the same region grid
(e.g. the Scale 1 and Scale 2 networks, or RAZN's own coarse and fine networks run on
every region), the *oracle* zooms exactly on the regions where the fine prediction
labels more of the region's annotated pixels correctly than the coarse one (ties: no
zoom, the cheaper action).  Its pooled mean IoU is what a perfect policy over those two
predictions reaches; if it is not clearly above the coarse prediction's, no policy can
make zooming pay on that cohort.  (The oracle maximises each region's pixel accuracy,
not the pooled mean IoU, which no per-region rule can; it is the natural per-region
"Scale 2 beats Scale 1".)

Everything here works on label maps (class indices, ``ignore`` = unannotated) on the
evaluation grid and on *blocks*: each region's footprint on that grid
(:func:`region_blocks`).  :func:`merge` puts a decision's predictions together the way
RAZN's inference does (each region wholly from one branch); :func:`region_table` gives
per-region counts for the diagnosis (correct pixels of each branch, the majority true
class).  TensorFlow-free.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from h2g.core.errors import ConfigError
from h2g.io.classes import IGNORE


def region_blocks(top_left: np.ndarray, size: int, scale: float, shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Footprints on a label map of ``shape`` of square regions ``size`` px a side, whose
    top-left corners ``top_left`` (N, 2: row, col) are in the regions' grid px; one grid px
    is ``scale`` label-map px (``scale`` = the grid's downsample / the label map's).  Edges
    are rounded to the nearest label-map pixel and clipped to the map, so regions that
    tile their grid get footprints that tile the map (one may be empty at the border)."""
    if scale <= 0 or size < 1:
        raise ConfigError(f"region blocks need a positive scale and size, got {scale} and {size}")
    rows, cols = int(shape[0]), int(shape[1])
    out = []
    for r, c in np.asarray(top_left, np.float64).reshape(-1, 2):
        r0, r1 = (int(np.clip(round(v * scale), 0, rows)) for v in (r, r + size))
        c0, c1 = (int(np.clip(round(v * scale), 0, cols)) for v in (c, c + size))
        out.append((slice(r0, r1), slice(c0, c1)))
    return out


def _check(maps: Sequence[np.ndarray]) -> None:
    shapes = {np.shape(m) for m in maps}
    if len(shapes) != 1:
        raise ConfigError(f"label maps of different shapes: {sorted(shapes)}")


def block_counts(pred: np.ndarray, truth: np.ndarray, blocks, ignore: int = IGNORE) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, annotated)`` per block: pixels where ``pred`` equals the truth, and
    annotated pixels (truth not ``ignore``)."""
    _check([pred, truth])
    annotated = truth != ignore
    hit = (pred == truth) & annotated
    correct = np.array([int(hit[b].sum()) for b in blocks], np.int64)
    total = np.array([int(annotated[b].sum()) for b in blocks], np.int64)
    return correct, total


def oracle_zoom(coarse: np.ndarray, fine: np.ndarray, truth: np.ndarray, blocks, ignore: int = IGNORE) -> np.ndarray:
    """Per block: True where ``fine`` labels strictly more annotated pixels correctly than
    ``coarse`` (module doc)."""
    c0, _ = block_counts(coarse, truth, blocks, ignore)
    c1, _ = block_counts(fine, truth, blocks, ignore)
    return c1 > c0


def merge(coarse: np.ndarray, fine: np.ndarray, blocks, zoom: np.ndarray) -> np.ndarray:
    """The label map RAZN's inference makes of the two branches: each block from ``fine``
    where ``zoom``, from ``coarse`` elsewhere (pixels outside every block: ``coarse``)."""
    _check([coarse, fine])
    zoom = np.asarray(zoom, bool)
    if len(zoom) != len(blocks):
        raise ConfigError(f"{len(zoom)} zoom decisions for {len(blocks)} regions")
    out = np.array(coarse, copy=True)
    for block, z in zip(blocks, zoom):
        if z:
            out[block] = fine[block]
    return out


def majority_class(truth: np.ndarray, blocks, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """Per block: the most frequent annotated class (ties: the lower index), -1 where
    the block has no annotated pixel."""
    out = np.full(len(blocks), -1, np.int64)
    for i, b in enumerate(blocks):
        t = truth[b]
        t = t[t != ignore]
        if t.size:
            out[i] = int(np.argmax(np.bincount(t.astype(np.int64), minlength=n_classes)))
    return out


def region_table(coarse: np.ndarray, fine: np.ndarray, truth: np.ndarray, blocks, n_classes: int,
                 ignore: int = IGNORE) -> dict[str, np.ndarray]:
    """Per block: ``correct_coarse``, ``correct_fine``, ``annotated``, ``majority``
    (:func:`majority_class`) and ``oracle`` (:func:`oracle_zoom`)."""
    c0, total = block_counts(coarse, truth, blocks, ignore)
    c1, _ = block_counts(fine, truth, blocks, ignore)
    return {"correct_coarse": c0, "correct_fine": c1, "annotated": total,
            "majority": majority_class(truth, blocks, n_classes, ignore), "oracle": c1 > c0}
