"""(split from h2g.patches; docstring to write)"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from h2g.core.errors import AnnotationError


@dataclass
class Annotation:
    """A boolean tumour mask; ``downsample`` is level-0 pixels per mask pixel."""

    mask: np.ndarray
    downsample: float
    path: Path


def _read_mask_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError("the TIFF holds no image")
            return tif.series[0].levels[0].asarray()
    with Image.open(path) as image:
        return np.asarray(image)


def _binarise(values: np.ndarray) -> np.ndarray:
    if values.ndim == 3:
        values = values[..., 0]
    if values.dtype == bool:
        return values
    if values.size and values.max() <= 1:
        return values > 0
    return values > 127


def load_annotation(path, slide, downsample: float = 4.0) -> Annotation:
    """Read the tumour mask at ``path`` for ``slide`` (an :class:`h2g.wsi.Slide`) at
    ``downsample``.  Its size must be the slide's level-0 size / ``downsample`` rounded
    down or up, else an :class:`AnnotationError` naming both sizes."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    try:
        values = _read_mask_image(path)
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise AnnotationError(path, f"cannot read the mask image: {exc}") from None
    if values.ndim not in (2, 3):
        raise AnnotationError(path, f"mask must be a 2-D image, got shape {values.shape}")
    mask = _binarise(values)
    width, height = slide.dimensions
    expected_w = {math.floor(width / downsample), math.ceil(width / downsample)}
    expected_h = {math.floor(height / downsample), math.ceil(height / downsample)}
    mask_h, mask_w = mask.shape
    if mask_w not in expected_w or mask_h not in expected_h:
        want = f"{round(width / downsample)}x{round(height / downsample)}"
        raise AnnotationError(
            path, f"mask is {mask_w}x{mask_h} px but slide {slide.path} ({width}x{height}) at "
                  f"downsample {downsample:g} needs {want} px")
    return Annotation(mask=mask, downsample=float(downsample), path=path)
