"""A slide-wide raster of class probabilities that knows where it lies on the slide.

:class:`Raster` holds ``probs`` ``(H, W, C)`` float32, its ``downsample`` (level-0 pixels
per raster pixel, the same along x and y) and the slide's level-0 ``extent`` ``(w, h)``.
Raster pixel ``(r, c)`` covers level-0 ``[c * d, (c + 1) * d) x [r * d, (r + 1) * d)``;
the raster has ``ceil(h / d)`` x ``ceil(w / d)`` pixels, so a non-square slide gives a
non-square raster (nothing is squashed into a square: compare H2G-Net's S x S
refinement view).  ``covered`` marks the pixels a prediction landed on (windows over
tissue); the rest are "not segmented".

TensorFlow-free (numpy and PIL).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from h2g.core.errors import ConfigError


def raster_shape(extent: tuple[int, int], downsample: float) -> tuple[int, int]:
    """``(rows, cols)`` of a raster at ``downsample`` over a level-0 ``extent`` (w, h)."""
    if not downsample > 0:
        raise ConfigError(f"raster downsample must be positive, got {downsample}")
    width, height = extent
    return max(1, int(np.ceil(height / downsample - 1e-9))), max(1, int(np.ceil(width / downsample - 1e-9)))


def _resize_plane(plane: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """PIL resize of a 2-D array to ``size`` = (w, h) (float: bilinear / nearest)."""
    if nearest:
        image = Image.fromarray(np.ascontiguousarray(plane, np.int32), mode="I")
        return np.asarray(image.resize(size, Image.NEAREST)).astype(plane.dtype)
    image = Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
    return np.asarray(image.resize(size, Image.BILINEAR), np.float32)


@dataclass
class Raster:
    """Class probabilities over a slide (see the module doc)."""

    probs: np.ndarray  # (H, W, C) float32
    downsample: float  # level-0 px per raster px
    extent: tuple[int, int]  # the slide's level-0 (w, h)
    covered: np.ndarray | None = None  # (H, W) bool: a prediction landed here

    def __post_init__(self):
        self.probs = np.asarray(self.probs, np.float32)
        if self.probs.ndim != 3:
            raise ConfigError(f"raster probabilities must be (H, W, C), got shape {self.probs.shape}")
        self.extent = (int(self.extent[0]), int(self.extent[1]))
        self.downsample = float(self.downsample)
        if self.covered is None:
            self.covered = np.ones(self.probs.shape[:2], bool)

    @classmethod
    def empty(cls, extent: tuple[int, int], downsample: float, classes: int) -> "Raster":
        """An all-zero, nowhere-covered raster of ``classes`` channels."""
        shape = raster_shape(extent, downsample)
        return cls(np.zeros(shape + (int(classes),), np.float32), downsample, extent, np.zeros(shape, bool))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.probs.shape[:2])

    @property
    def classes(self) -> int:
        return int(self.probs.shape[2])

    @property
    def covered_extent(self) -> tuple[float, float]:
        """Level-0 (w, h) the raster's pixels span (>= ``extent``: the last row / column
        may run past the slide's edge)."""
        return self.shape[1] * self.downsample, self.shape[0] * self.downsample

    def label_map(self, fill: int = -1) -> np.ndarray:
        """``(H, W)`` int32 arg-max class index; ``fill`` where nothing was predicted.
        Ties go to the lower class index (numpy's arg-max)."""
        labels = np.argmax(self.probs, axis=-1).astype(np.int32)
        labels[~self.covered] = fill
        return labels

    def class_mask(self, index: int) -> np.ndarray:
        """Where class ``index`` is the arg-max (only covered pixels)."""
        return self.label_map() == int(index)

    def resized(self, downsample: float) -> "Raster":
        """The raster resampled to another ``downsample`` (bilinear probabilities,
        nearest ``covered``), over the same extent."""
        rows, cols = raster_shape(self.extent, downsample)
        planes = [_resize_plane(self.probs[..., c], (cols, rows), False) for c in range(self.classes)]
        covered = _resize_plane(self.covered.astype(np.int32), (cols, rows), True) > 0
        return Raster(np.stack(planes, axis=-1), downsample, self.extent, covered)

    def crop(self, x: float, y: float, width: float, height: float) -> "Raster":
        """The raster pixels under the level-0 box ``(x, y, width, height)`` (whole pixels
        that the box touches); its extent is the box's size, clipped to the slide."""
        d = self.downsample
        c0, r0 = max(0, int(np.floor(x / d))), max(0, int(np.floor(y / d)))
        c1 = min(self.shape[1], int(np.ceil((x + width) / d)))
        r1 = min(self.shape[0], int(np.ceil((y + height) / d)))
        if c1 <= c0 or r1 <= r0:
            raise ConfigError(f"crop ({x:g}, {y:g}, {width:g}, {height:g}) lies outside the raster")
        extent = (min(self.extent[0] - c0 * d, (c1 - c0) * d), min(self.extent[1] - r0 * d, (r1 - r0) * d))
        return Raster(self.probs[r0:r1, c0:c1].copy(), d, (round(extent[0]), round(extent[1])),
                      self.covered[r0:r1, c0:c1].copy())
