"""Maps drawn for people: grey-level and colour PNGs, maps blended over a slide's
thumbnail, and pyramidal TIFFs that overlay the slide in a viewer.

One set of writers for the training pipeline's heatmap figures
(:func:`write_heatmap_overlay`: the heatmap in matplotlib's ``inferno`` over the slide's
smallest level) and for deployment's outputs (:func:`write_grey_png`,
:func:`write_map_tiff`, :func:`write_label_overlay`).  Every file is written atomically
(:func:`h2g.core.atomic.replace_atomically`): a reader never sees half an image.

TensorFlow-free; matplotlib is imported only by :func:`colourise` (the training side).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from h2g.core.atomic import replace_atomically
from h2g.io.pyramid import write_pyramid

OVERLAY_ALPHA = 0.45  # weight of the map over the thumbnail


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] or a boolean mask as uint8 grey levels (x 255)."""
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    return np.clip(np.rint(np.asarray(values, np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_png(path, image: np.ndarray) -> Path:
    """``image`` (uint8 grey or RGB) as a PNG at ``path``, atomically."""
    pil = Image.fromarray(np.ascontiguousarray(image))
    return replace_atomically(path, lambda tmp: pil.save(tmp, format="PNG"))


def write_grey_png(path, values: np.ndarray) -> Path:
    """A probability map or mask as a grey-level PNG (:func:`to_uint8`)."""
    return write_png(path, to_uint8(values))


def colourise(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """``(h, w)`` values in [0, 1] as ``(h, w, 3)`` uint8 RGB through a matplotlib colour map."""
    from matplotlib import colormaps

    return (colormaps[cmap](values)[..., :3] * 255).astype(np.uint8)


def label_colours(labels: np.ndarray, colours: Sequence[Sequence[int]], fill=(0, 0, 0)) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of a label map: class ``i`` in ``colours[i]``; labels
    outside ``0..len(colours)-1`` (e.g. -1, not segmented) in ``fill``."""
    palette = np.asarray(list(colours) + [fill], np.uint8)
    index = np.where((labels >= 0) & (labels < len(colours)), labels, len(colours))
    return palette[index]


def blend_over(base_rgb: np.ndarray, map_rgb: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """``map_rgb`` resized (nearest) to ``base_rgb``'s size and blended over it with
    weight ``alpha`` (``PIL.Image.blend``)."""
    base = Image.fromarray(np.ascontiguousarray(base_rgb)).convert("RGB")
    layer = Image.fromarray(np.ascontiguousarray(map_rgb)).resize(base.size, Image.NEAREST)
    return Image.blend(base, layer, alpha)


#: Longest side of a thumbnail read from a slide whose smallest level is larger (no pyramid).
THUMBNAIL_SIDE = 2048


def thumbnail(slide) -> np.ndarray:
    """The slide's smallest pyramid level as ``(h, w, 3)`` uint8 RGB; when that level is
    more than twice :data:`THUMBNAIL_SIDE` (a slide without a pyramid), the level
    box-shrunk region by region to about that size."""
    level = slide.level_count - 1
    factor = max(slide.level_dimensions[level]) // THUMBNAIL_SIDE
    return slide.read_level(level) if factor < 2 else slide.read_level_shrunk(level, factor)


def write_overlay(path, slide, map_rgb: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Path:
    """PNG of ``map_rgb`` (covering the slide's extent) blended over its thumbnail."""
    image = blend_over(thumbnail(slide), map_rgb, alpha)
    return replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def write_heatmap_overlay(path, slide, probs: np.ndarray, alpha: float = OVERLAY_ALPHA,
                          cmap: str = "inferno") -> Path:
    """PNG of a heatmap (patch-grid probabilities, any shape over the slide) in ``cmap``
    over the slide's thumbnail: the training pipeline's heatmap figure."""
    return write_overlay(path, slide, colourise(probs, cmap), alpha)


def write_label_overlay(path, slide, labels: np.ndarray, colours: Sequence[Sequence[int]],
                        alpha: float = OVERLAY_ALPHA) -> Path:
    """PNG of a label map in its classes' colours over the slide's thumbnail."""
    return write_overlay(path, slide, label_colours(labels, colours), alpha)


def write_map_tiff(path, values: np.ndarray, mpp: float, downsample: float) -> Path:
    """A map (probabilities, a mask, or a uint8 label image) as a lossless pyramidal TIFF
    whose pixels are ``downsample`` level-0 px of a slide with ``mpp`` microns per level-0
    px, so that it overlays the slide.  Probabilities and masks become grey levels
    (:func:`to_uint8`); integer labels are written as they are."""
    plane = values if values.dtype == np.uint8 else to_uint8(values)
    return replace_atomically(path, lambda tmp: write_pyramid(tmp, plane, mpp=mpp * downsample,
                                                              compression="zlib"))


def write_square_map_tiff(path, values: np.ndarray, dimensions: tuple[int, int], mpp: float) -> Path:
    """An S x S map over a slide of level-0 ``dimensions`` = (w, h) (H2G-Net's
    refinement view) resized to the slide's aspect ratio (long side S: nearest for masks,
    bilinear otherwise) and written by :func:`write_map_tiff`."""
    width, height = dimensions
    downsample = max(width, height) / values.shape[0]
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    resample = Image.NEAREST if values.dtype == bool else Image.BILINEAR
    plane = np.asarray(Image.fromarray(to_uint8(values)).resize(size, resample))
    return write_map_tiff(path, plane, mpp, downsample)
