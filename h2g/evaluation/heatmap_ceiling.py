"""The ceiling a patch grid puts on patch-wise designs: the Dice of a perfect patch
classifier's heatmap.

A perfect classifier gives each patch its true tumour fraction (``soft``), or the
training label "fraction > ``tumour_threshold``" (``label``).  Its heatmap is then
rasterised exactly as a real one is (:func:`h2g.inference.lowres.heatmap_raster`, at the
refinement resolution) and scored against the refinement target
(:func:`h2g.inference.lowres.target_mask`) at 0.5.  A slide only a few patches a side
caps every patch-wise design well below 1, whatever the classifier; a smaller heatmap
stride raises the cap.  TensorFlow-free.
"""
from __future__ import annotations

import math

import numpy as np

from h2g.core.errors import ConfigError
from h2g.evaluation.metrics import segmentation_metrics
from h2g.inference.heatmap import Heatmap, check_stride
from h2g.inference.lowres import heatmap_raster, target_mask
from h2g.io.annotation import load_annotation
from h2g.tiling.grid import area_fractions


def patch_tumour_fractions(annotation, dimensions: tuple[int, int], step: int, patch_extent: int) -> np.ndarray:
    """``(rows, cols)``: the tumour fraction of the ``patch_extent`` (level-0 px) patch
    centred on each ``step`` px cell of a slide of level-0 ``dimensions`` (the part of a
    patch beyond the slide counts as non-tumour).  Exact area averages, on a fine grid
    that both the cells and the patches' edges fall on."""
    width, height = dimensions
    offset = (patch_extent - step) // 2  # how far a patch reaches beyond its cell, each side
    fine = math.gcd(step, offset) if offset else step
    rows, cols = -(-height // step), -(-width // step)
    per_cell, per_patch, pad = step // fine, patch_extent // fine, offset // fine
    fine_rows, fine_cols = rows * per_cell, cols * per_cell
    fractions = area_fractions(annotation.mask.astype(np.float32), annotation.downsample, fine,
                               (fine_rows, fine_cols))
    padded = np.zeros((fine_rows + 2 * pad + 1, fine_cols + 2 * pad + 1))
    padded[1 + pad:1 + pad + fine_rows, 1 + pad:1 + pad + fine_cols] = fractions
    box = padded.cumsum(0).cumsum(1)  # summed-area table: box sums in O(1)
    top = np.arange(rows) * per_cell
    left = np.arange(cols) * per_cell
    t, l = np.meshgrid(top, left, indexing="ij")
    b, r = t + per_patch, l + per_patch
    return (box[b, r] - box[t, r] - box[b, l] + box[t, l]) / per_patch ** 2


def slide_ceiling(slide, annotation_path, *, size: int, magnification: float = 10.0, patch_size: int = 256,
                  stride: int | None = None, tumour_threshold: float = 0.25,
                  annotation_downsample: float = 4.0) -> dict[str, float]:
    """Dice at ``size`` x ``size`` of a perfect classifier's heatmap on one slide:
    ``{"soft": ..., "label": ...}`` (see the module doc)."""
    stride = check_stride(stride, patch_size)
    downsample = slide.downsample_for(magnification)
    step, patch_extent = int(round(stride * downsample)), int(round(patch_size * downsample))
    if (patch_extent - step) % 2:
        raise ConfigError(f"{slide.path}: a {stride} px stride does not centre {patch_size} px patches on whole "
                          f"level-0 pixels at {magnification:g}x")
    annotation = load_annotation(annotation_path, slide, downsample=annotation_downsample)
    fractions = patch_tumour_fractions(annotation, slide.dimensions, step, patch_extent)
    truth = target_mask(annotation_path, slide, size, annotation_downsample)
    out = {}
    for name, probs in (("soft", fractions), ("label", (fractions > tumour_threshold).astype(np.float32))):
        raster = heatmap_raster(Heatmap(probs=probs.astype(np.float32), step=step), slide.dimensions, size)
        out[name] = segmentation_metrics(raster > 0.5, truth)["dice"]
    return out
