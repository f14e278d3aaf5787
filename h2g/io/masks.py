"""Raster annotation images (masks, label maps): their pyramid levels, read whole or by
region.

:func:`open_mask_image` opens a PNG (or any image PIL reads) or a TIFF.  A TIFF's
pyramid levels (tifffile's series levels: the reduced pages OpenSlide-style pyramids and
CAMELYON16's masks carry) are :class:`MaskLevel` s that read any region by decoding only
the tiles or strips it touches (``os.pread`` of their bytes, tifffile's decoder; a small
cache of decoded segments), so a mask of 25k x 55k px is never held whole.  A PNG has one
level, read whole; one over PIL's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``) is an
:class:`~h2g.core.errors.AnnotationError` suggesting a tiled TIFF.  Values are channel 0
of multi-channel images.  TensorFlow-free.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from h2g.core.errors import AnnotationError

#: decoded tiles / strips kept per level
CACHE_SEGMENTS = 64


class MaskLevel:
    """One resolution of a mask image: ``width`` x ``height`` px, ``downsample`` image
    level-0 px per px, values of ``dtype``."""

    def __init__(self, width: int, height: int, downsample: float, dtype):
        self.width, self.height = int(width), int(height)
        self.downsample = float(downsample)
        self.dtype = np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.dtype.itemsize

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w)`` values of the region at ``(x, y)`` (level pixels; inside the level)."""
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        return self.read(0, 0, self.width, self.height)


class _ArrayLevel(MaskLevel):
    def __init__(self, values: np.ndarray, downsample: float = 1.0):
        super().__init__(values.shape[1], values.shape[0], downsample, values.dtype)
        self.values = values

    def read(self, x, y, w, h):
        return self.values[y:y + h, x:x + w]

    def read_all(self):
        return self.values


class _TiffLevel(MaskLevel):
    """A TIFF page read segment by segment (tiles, or strips of whole rows)."""

    def __init__(self, image: "MaskImage", series_level, downsample: float):
        page = series_level.keyframe
        shape = series_level.shape
        super().__init__(page.imagewidth, page.imagelength, downsample, series_level.dtype)
        self._image, self._series, self._page = image, series_level, page
        self.tiled = bool(page.is_tiled)
        self.seg_w = page.tilewidth if self.tiled else page.imagewidth
        self.seg_h = page.tilelength if self.tiled else min(page.rowsperstrip or page.imagelength, page.imagelength)
        self.across = -(-self.width // self.seg_w)
        self._offsets, self._counts = page.dataoffsets, page.databytecounts
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._shape = shape

    def read_all(self):
        values = self._series.asarray()
        return values[..., 0] if values.ndim == 3 else values

    def _segment(self, index: int) -> np.ndarray:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        count = int(self._counts[index])
        if count:
            data = os.pread(self._image.fd, count, int(self._offsets[index]))
            segment = self._page.decode(data, index, jpegtables=self._page.jpegtables)[0]
            segment = np.asarray(segment)
            segment = segment.reshape(segment.shape[-3:])[..., 0]
        else:  # a missing tile (sparse TIFF): zeros
            segment = np.zeros((self.seg_h, self.seg_w), self.dtype)
        with self._lock:
            self._cache[index] = segment
            while len(self._cache) > CACHE_SEGMENTS:
                self._cache.popitem(last=False)
        return segment

    def read(self, x, y, w, h):
        out = np.empty((h, w), self.dtype)
        for row in range(y // self.seg_h, (y + h - 1) // self.seg_h + 1):
            for col in range(x // self.seg_w, (x + w - 1) // self.seg_w + 1):
                segment = self._segment(row * self.across + col)
                sx, sy = col * self.seg_w, row * self.seg_h
                x0, y0 = max(x, sx), max(y, sy)
                x1 = min(x + w, sx + self.seg_w, self.width)
                y1 = min(y + h, sy + self.seg_h, self.height)
                part = segment[y0 - sy:y1 - sy, x0 - sx:x1 - sx]
                out[y0 - y:y0 - y + part.shape[0], x0 - x:x0 - x + part.shape[1]] = part
        return out


class MaskImage:
    """A mask image's levels, finest first (``levels[0]`` is the image's level 0)."""

    def __init__(self, path: Path, levels: list[MaskLevel] | None = None):
        self.path = Path(path)
        self.levels: list[MaskLevel] = levels or []
        self.fd: int | None = None
        self._tif = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].width, self.levels[0].height

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def open_mask_image(path) -> MaskImage:
    """Open the mask image at ``path`` (see the module doc); :class:`AnnotationError`
    naming the file when it cannot be read."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff") or _is_tiff(path):
            return _open_tiff(path)
        return _open_pil(path)
    except AnnotationError:
        raise
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError, Image.DecompressionBombError) as exc:
        raise AnnotationError(path, f"cannot read the mask image: {exc}") from None


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _open_tiff(path: Path) -> MaskImage:
    image = MaskImage(path)
    tif = tifffile.TiffFile(path)
    try:
        if not tif.series:
            raise ValueError("the TIFF holds no image")
        series = tif.series[0]
        levels = list(series.levels)
        width0 = levels[0].keyframe.imagewidth
        image._tif = tif
        image.fd = os.open(path, os.O_RDONLY)
        for level in levels:
            page = level.keyframe
            if len(level.shape) not in (2, 3) or (len(level.shape) == 3 and level.shape[-1] != page.samplesperpixel):
                if level is levels[0]:
                    raise AnnotationError(path, f"mask must be a 2-D image, got shape {level.shape}")
                break
            image.levels.append(_TiffLevel(image, level, width0 / page.imagewidth))
    except BaseException:
        image.close()
        tif.close()
        raise
    return image


def _too_large(path: Path, size: str) -> AnnotationError:
    return AnnotationError(
        path, f"{size} is over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels: save a mask this large as a tiled "
              "(pyramidal) TIFF, which is read region by region (e.g. tifffile.imwrite(path, mask, "
              "tile=(256, 256), compression='zlib'))")


def _open_pil(path: Path) -> MaskImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError:
            raise _too_large(path, "the image") from None
    with opened:
        width, height = opened.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            raise _too_large(path, f"{width}x{height} px")
        values = np.asarray(opened)
    if values.ndim not in (2, 3):
        raise AnnotationError(path, f"mask must be a 2-D image, got shape {values.shape}")
    if values.ndim == 3:
        values = values[..., 0]
    return MaskImage(path, [_ArrayLevel(values)])
