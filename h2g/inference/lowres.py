"""H2G-Net's refinement stage inputs and prediction, for training and deployment alike:
the lowest pyramid level with at least ``size`` px a side resized to ``size`` x ``size``
(:func:`refinement_inputs`), the patch heatmap placed on the slide's level-0 extent
(:func:`heatmap_raster`), and the refinement network run through a backend
(:func:`refine`).  TensorFlow-free."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from h2g.core.errors import ConfigError, ExportError
from h2g.inference.backends import INPUT_NAMES, Backend
from h2g.inference.heatmap import Heatmap


# --------------------------------------------------------------------------------------
# Refinement stage
# --------------------------------------------------------------------------------------
def _resize_plane(plane: np.ndarray, size: int, box=None) -> np.ndarray:
    """Bilinear resize of a 2-D float array to ``size`` x ``size`` (PIL; ``box`` is the
    source rectangle in pixel units, fractional allowed)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box), dtype=np.float32)


#: Refinement sizes accepted (--size): the paper's is 1024, smoke models' 256.
MIN_SIZE, MAX_SIZE = 16, 8192
#: A level more than this many times the size on its short side, and too large to read
#: whole (more than WHOLE_LEVEL_PX pixels: a slide without a pyramid), is read box-shrunk
#: first; any other level is read whole, as training always has.
OVERSAMPLE = 4
WHOLE_LEVEL_PX = 64 * 2**20


def lowres_level(slide, size: int = 1024) -> int:
    """The lowest-resolution pyramid level with at least ``size`` px on each side
    (level 0 when none has)."""
    big = [i for i, (w, h) in enumerate(slide.level_dimensions) if min(w, h) >= size]
    return max(big, key=lambda i: slide.level_downsamples[i]) if big else 0


def heatmap_raster(heatmap: Heatmap, dimensions: tuple[int, int], size: int) -> np.ndarray:
    """The heatmap over the slide's level-0 extent ``dimensions`` = (w, h), bilinearly
    resized to ``size`` x ``size``.  Cells sit at their level-0 positions: the grid may
    stop short of the slide's partial last row / column (those areas count as 0) or run
    past its edge (cropped)."""
    width, height = dimensions
    step = float(heatmap.step)
    rows, cols = heatmap.grid_shape
    ext_rows, ext_cols = max(rows, -(-height // heatmap.step)), max(cols, -(-width // heatmap.step))
    cells = np.zeros((ext_rows, ext_cols), np.float32)
    cells[:rows, :cols] = heatmap.probs
    return _resize_plane(cells, size, box=(0.0, 0.0, width / step, height / step))


def refinement_inputs(slide, heatmap: Heatmap | None, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The refinement network's inputs: ``image`` ``(size, size, 3)`` float32 in [0, 1] -
    the lowest pyramid level with at least ``size`` px a side (:func:`lowres_level`),
    scaled to [0, 1] and bilinearly resized; a level more than :data:`OVERSAMPLE` times
    ``size`` on its short side and over :data:`WHOLE_LEVEL_PX` pixels (no pyramid) is
    first box-shrunk to 2-3 times ``size``
    (:meth:`h2g.io.slide.Slide.read_level_shrunk`, region by region), never read whole -
    and ``heat`` ``(size, size, 1)`` float32 -
    the heatmap placed on the slide's level-0 extent and resized the same way
    (:func:`heatmap_raster`; zeros when ``heatmap`` is None, for image-only models)."""
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ConfigError(f"refinement size {size}: must be from {MIN_SIZE} to {MAX_SIZE} px")
    index = lowres_level(slide, size)
    width, height = slide.level_dimensions[index]
    large = min(width, height) > OVERSAMPLE * size and width * height > WHOLE_LEVEL_PX
    factor = min(width, height) // (2 * size) if large else 1
    if factor == 1:
        level, box = slide.read_level(index), None
    else:  # no pyramid level near the size (a single-level slide): read it shrunk, region by region
        level, box = slide.read_level_shrunk(index, factor), (0.0, 0.0, width / factor, height / factor)
    image = np.stack([_resize_plane(level[..., c].astype(np.float32) / 255.0, size, box) for c in range(3)],
                     axis=-1)
    if heatmap is None:
        heat = np.zeros((size, size), np.float32)
    else:
        heat = heatmap_raster(heatmap, slide.dimensions, size)
    return np.clip(image, 0.0, 1.0), np.clip(heat, 0.0, 1.0)[..., None]


def refine(backend: Backend, image: np.ndarray, heat: np.ndarray | None = None) -> np.ndarray:
    """Tumour probability ``(S, S)`` of a refinement network (inputs ``image`` +
    ``heatmap``) or an image-only low-resolution network (input ``image``)."""
    backend.require_inputs(INPUT_NAMES, "refinement network")
    feed = {"image": image[None]}
    if "heatmap" in backend.input_names:
        if heat is None:
            raise ExportError(f"{backend.source}: the refinement network needs a heatmap")
        feed["heatmap"] = heat.reshape(heat.shape[0], heat.shape[1], 1)[None]
    out = backend.predict(feed)
    if out.ndim != 4 or out.shape[-1] < 2:
        raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} is not "
                          "(1, S, S, classes) segmentation probabilities")
    return out[0, ..., 1]


def target_mask(annotation_path: Path, slide, size: int, downsample: float = 4.0, *,
                required: bool = False) -> np.ndarray:
    """The tumour annotation (raster or polygons) on a ``size x size`` grid over the
    slide's full extent (the frame of the low-resolution image): area-averaged, then
    tumour where >= 0.5 (:meth:`h2g.io.annotation.Annotation.coverage`: the mask at
    ``downsample`` box-filtered, or polygons sampled finely within each cell).  The truth
    that refined and low-resolution predictions are trained and scored against;
    ``required``: a test slide's annotation may not be empty."""
    from h2g.io.annotation import load_annotation

    annotation = load_annotation(annotation_path, slide, downsample=downsample, required=required)
    return annotation.coverage(annotation.classes.tumour_index, size, size) >= 0.5
