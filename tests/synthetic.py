"""Small synthetic slides and masks whose contents are known exactly, for tests.

Import from tests as ``from synthetic import make_slide, make_mask, ...`` (pytest puts
``tests/`` on ``sys.path``).  Slides are pyramidal TIFFs written with
:func:`h2g.io.pyramid.write_pyramid`, which OpenSlide opens as ``generic-tiff``.

Patterns (``slide_image(size, pattern)``):

- ``"tissue"``: white glass with one block of :data:`TISSUE_RGB` covering ``tissue``
  (level-0 ``(x, y, w, h)``; default: the middle half of the slide).
- ``"checker"``: the slide cut into ``cell`` x ``cell`` level-0 blocks (default 1024, one
  256 x 256 patch at 10x when mpp = 0.25), each a flat colour encoding its grid position:
  :func:`cell_colour` / :func:`decode_cell` convert between ``(row, col)`` and colour.
- ``"noise"``: seeded random texture (8 x 8 px blocks), for resampling checks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from h2g.io.pyramid import write_pyramid

GLASS_RGB = (255, 255, 255)
TISSUE_RGB = (200, 80, 150)
CELL_BASE, CELL_STEP, CELL_BLUE = 40, 20, 100
MAX_CELLS = (255 - CELL_BASE) // CELL_STEP  # rows / cols a checker can encode


def cell_colour(row: int, col: int) -> tuple[int, int, int]:
    """The checker colour of grid cell (row, col): red encodes the column, green the row."""
    if not (0 <= row < MAX_CELLS and 0 <= col < MAX_CELLS):
        raise ValueError(f"cell ({row}, {col}) outside the encodable {MAX_CELLS}x{MAX_CELLS} grid")
    return CELL_BASE + CELL_STEP * col, CELL_BASE + CELL_STEP * row, CELL_BLUE


def decode_cell(rgb: np.ndarray) -> tuple[int, int]:
    """(row, col) of a checker cell from an image of it (its median colour)."""
    r, g = (float(np.median(rgb[..., c])) for c in (0, 1))
    return round((g - CELL_BASE) / CELL_STEP), round((r - CELL_BASE) / CELL_STEP)


def slide_image(
    size: tuple[int, int],
    pattern: str = "tissue",
    *,
    tissue: tuple[int, int, int, int] | None = None,
    cell: int = 1024,
    seed: int = 0,
) -> np.ndarray:
    """The level-0 RGB image ``(h, w, 3)`` uint8 of a synthetic slide (see module doc)."""
    w, h = size
    image = np.empty((h, w, 3), np.uint8)
    image[:] = GLASS_RGB
    if pattern == "tissue":
        x, y, tw, th = tissue or (w // 4, h // 4, w // 2, h // 2)
        image[y:y + th, x:x + tw] = TISSUE_RGB
    elif pattern == "checker":
        rows, cols = -(-h // cell), -(-w // cell)
        for r in range(rows):
            for c in range(cols):
                image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = cell_colour(r, c)
    elif pattern == "noise":
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (-(-h // 8), -(-w // 8), 3), dtype=np.uint8)
        image[:] = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:h, :w]
    else:
        raise ValueError(f"unknown pattern {pattern!r} (tissue, checker, noise)")
    return image


def make_slide(
    path,
    size: tuple[int, int] = (4096, 3072),
    mpp: float | None = 0.25,
    pattern: str = "tissue",
    *,
    downsamples: Sequence[int] = (1, 4, 16),
    compression: str | None = "jpeg",
    **pattern_kw,
) -> Path:
    """Write a synthetic pyramidal TIFF slide at ``path`` and return the path.

    ``mpp=None`` writes no resolution (a slide without scale); ``compression=None`` or
    ``"zlib"`` keeps pixels exact.  Extra keywords go to :func:`slide_image`."""
    image = slide_image(size, pattern, **pattern_kw)
    return write_pyramid(path, image, mpp=mpp, downsamples=list(downsamples),
                         compression=compression)


def mask_image(
    size: tuple[int, int], rects: Sequence[tuple[int, int, int, int]], downsample: int = 4
) -> np.ndarray:
    """Boolean mask of a slide of level-0 ``size`` at ``downsample``: ``ceil(w / ds)`` x
    ``ceil(h / ds)`` pixels, True inside each level-0 rect ``(x, y, w, h)`` (a mask pixel
    is set when the rect touches it; use multiples of ``downsample`` for exact areas)."""
    w, h = size
    mask = np.zeros((-(-h // downsample), -(-w // downsample)), bool)
    for x, y, rw, rh in rects:
        mask[y // downsample:-(-(y + rh) // downsample), x // downsample:-(-(x + rw) // downsample)] = True
    return mask


def make_mask(
    path,
    size: tuple[int, int],
    rects: Sequence[tuple[int, int, int, int]],
    downsample: int = 4,
) -> Path:
    """Write a tumour mask (255 = tumour, 0 = not) for a slide of level-0 ``size``:
    ``.png`` as a plain 8-bit PNG, ``.tif``/``.tiff`` as a lossless pyramidal TIFF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = mask_image(size, rects, downsample).astype(np.uint8) * 255
    if path.suffix.lower() == ".png":
        Image.fromarray(mask).save(path)
        return path
    if path.suffix.lower() in (".tif", ".tiff"):
        return write_pyramid(path, mask, mpp=None, compression="zlib")
    raise ValueError(f"mask path must end in .png, .tif or .tiff: {path}")
