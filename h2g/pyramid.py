"""Write tiled, pyramidal TIFF files that OpenSlide opens as "generic-tiff".

Each pyramid level is its own top-level page (not a SubIFD: OpenSlide's generic TIFF
reader only looks at top-level directories; reduced levels carry NewSubfileType=1, without
which OpenSlide 4 sees level 0 only), tiled, JPEG-compressed by default, with the
resolution stored in pixels per centimetre so that OpenSlide reports microns per pixel.

Two entry points:
- :func:`write_pyramid` for an image held in memory (test slides, masks);
- :func:`write_pyramid_tiles` for images too large to hold: the caller gives a function
  that renders any level-0 region, and levels are written tile by tile, each from the
  previous level's tiles, so memory stays bounded by a few tile rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile
from PIL import Image


def _resolution(mpp: float, downsample: float):
    # pixels per centimetre: 1 cm = 10_000 um
    ppcm = 10_000.0 / (mpp * downsample)
    return (ppcm, ppcm), "CENTIMETER"


def _default_downsamples(width: int, height: int, min_side: int = 512) -> list[int]:
    downsamples = [1]
    while max(width, height) // (downsamples[-1] * 4) >= min_side:
        downsamples.append(downsamples[-1] * 4)
    return downsamples


def _shrink(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, int(round(w / factor))), max(1, int(round(h / factor))))
    if image.dtype == bool:
        return np.asarray(Image.fromarray(image.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    resample = Image.BOX if image.ndim == 3 else Image.NEAREST
    return np.asarray(Image.fromarray(image).resize(size, resample))


def _tile_kwargs(image: np.ndarray, tile: int, compression: str | None, quality: int):
    kw = dict(tile=(tile, tile), metadata=None)
    if compression == "jpeg" and image.ndim == 3:
        kw.update(compression="jpeg", compressionargs={"level": quality}, photometric="rgb")
    elif compression:
        kw.update(compression="zlib" if compression == "jpeg" else compression)
        kw.update(photometric="rgb" if image.ndim == 3 else "minisblack")
    else:
        kw.update(photometric="rgb" if image.ndim == 3 else "minisblack")
    return kw


def write_pyramid(
    path,
    image: np.ndarray,
    *,
    mpp: float | None = 0.25,
    downsamples: Sequence[int] | None = None,
    tile: int = 256,
    compression: str | None = "jpeg",
    quality: int = 90,
) -> Path:
    """Write ``image`` (``(h, w, 3)`` uint8 RGB, or ``(h, w)`` uint8/bool for masks) as a
    pyramidal tiled TIFF at ``path``.

    ``mpp`` is microns per level-0 pixel (``None`` writes no resolution).  ``downsamples``
    defaults to powers of 4 down to ~512 px on the long side.  Single-channel images use
    lossless zlib (JPEG would blur label masks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    h, w = image.shape[:2]
    downsamples = list(downsamples or _default_downsamples(w, h))
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for ds in downsamples:
            level = image if ds == 1 else _shrink(image, ds)
            kw = _tile_kwargs(level, tile, compression, quality)
            kw["subfiletype"] = 0 if ds == 1 else 1  # OpenSlide wants reduced levels marked
            if mpp is not None:
                kw["resolution"], kw["resolutionunit"] = _resolution(mpp, ds)
            tif.write(level, **kw)
    return path


def write_pyramid_tiles(
    path,
    size: tuple[int, int],
    render: Callable[[int, int, int, int], np.ndarray],
    *,
    mpp: float = 0.25,
    downsamples: Sequence[int] | None = None,
    tile: int = 256,
    quality: int = 90,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a large RGB pyramid without holding it in memory.

    ``render(x, y, w, h)`` returns the level-0 RGB region ``(h, w, 3)`` uint8.  Level 0 is
    written tile by tile from ``render``; every further level is rendered from level-0
    regions of ``tile * downsample`` pixels reduced by box filtering, one tile at a time,
    so peak memory is about one level-0 region of the coarsest tile.  ``progress`` is
    called with the number of tiles written after each tile.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    downsamples = list(downsamples or _default_downsamples(width, height))

    def tiles_for(ds: int):
        lw, lh = -(-width // ds), -(-height // ds)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                x0, y0 = tx * ds, ty * ds
                rw, rh = min(tile * ds, width - x0), min(tile * ds, height - y0)
                region = render(x0, y0, rw, rh)
                out = region if ds == 1 else _shrink(region, ds)
                padded = np.full((tile, tile, 3), 255, np.uint8)
                padded[: out.shape[0], : out.shape[1]] = out[:tile, :tile]
                if progress is not None:
                    progress(1)
                yield padded

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for ds in downsamples:
            lw, lh = -(-width // ds), -(-height // ds)
            res, unit = _resolution(mpp, ds)
            tif.write(
                tiles_for(ds),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                resolution=res,
                resolutionunit=unit,
                metadata=None,
                subfiletype=0 if ds == 1 else 1,  # OpenSlide wants reduced levels marked
            )
    return path
