"""Whole-slide images through OpenSlide, read at a magnification.

Magnification is objective power (40 = the paper's "x400", 10 = "x100", 1.25 = the
tissue plane).  A slide's objective power comes from its metadata or, when missing, from
its microns per pixel (about 10 / mpp, snapped to a standard objective: 0.2467 um/px ->
40x, 0.499 um/px -> 20x).  A slide with neither needs an explicit ``mpp`` (the manifest's
``mpp`` column or a tool's ``--mpp`` argument); without one it still opens, and only the
operations that need a magnification fail.  An explicit ``mpp`` overrides the file's
scale entirely: mpp and objective power (10 / mpp, snapped) both follow it, even when
the file gives an objective power.

Regions are read from the nearest finer pyramid level and resized with an area (box)
filter, so a 256 x 256 patch at 10x is right on a pyramid without a 10x level.
Transparent pixels (outside the scanned area, or padding beyond the slide's edge) become
white, like glass.  Every OpenSlide failure becomes a :class:`h2g.core.errors.SlideError`
naming the file.

``reader="tiles"`` (deployment's default, :mod:`h2g.io.tiles`) cuts regions straight out
of the decoded tiles of a tiled TIFF / SVS level when the region sits on that level's
pixel grid: the same pixels as OpenSlide, without its ARGB round trip.
``reader="reduced"`` also decodes JPEG tiles at 1/2, 1/4 or 1/8 size (libjpeg's DCT
scaling) for a magnification that has no level of its own but is that much coarser than
one, and for a whole level shrunk that much (tissue detection's 1.25x plane); those pixels
differ slightly from OpenSlide + area resize (what training saw), so it is opt-in.
Anything else is read by OpenSlide.  ``reader="openslide"`` (the default, and what
training uses) always reads through OpenSlide.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from h2g.core.choices import Choice
from h2g.core.errors import SlideError
from h2g.core.resources import available_cores

#: Objective powers that microns per pixel are snapped to when a slide gives no power.
STANDARD_POWERS = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)
#: Snap tolerance: derived power within this factor of a standard power takes its value.
SNAP_FACTOR = 1.15
#: Whole levels larger than one block are read in blocks of BAND_ROWS rows x BLOCK_COLS columns
#: (level px) by BAND_THREADS threads, so a read holds a few blocks at a time, whatever the
#: level's size (a slide without a pyramid has only its full-resolution level).
BAND_ROWS = 1024
BLOCK_COLS = 8192
BAND_THREADS = 2


class Reader(Choice):
    """How regions are read: always through OpenSlide, from decoded TIFF tiles where exact,
    or also from JPEG tiles decoded at reduced scale (see the module doc)."""

    OPENSLIDE = "openslide"
    TILES = "tiles"
    REDUCED = "reduced"


READERS = Reader.values()
#: A read of more blocks than this shows a progress bar: on a terminal (None), always (True), never (False).
PROGRESS_BLOCKS = 16
SHOW_PROGRESS: bool | None = None
#: Levels of more pixels than this (256 MiB of RGBA) are never read whole to be resized:
#: their coarse views come from an overview, the level box-shrunk once (region by region) by
#: the smallest power of two that brings its long side to OVERVIEW_SIDE px or less, kept
#: with the open slide (at most 192 MiB) - an in-memory pyramid level for slides without one.
LARGE_LEVEL_PIXELS = 1 << 26
OVERVIEW_SIDE = 8192
#: Suffixes of the slide formats OpenSlide reads; an unrecognised file with one of these
#: is reported as corrupt rather than "not a slide".
SLIDE_SUFFIXES = frozenset(
    ".svs .tif .tiff .ndpi .vms .vmu .scn .mrxs .svslide .bif .dcm .czi".split()
)
_PLAIN_IMAGES = {
    b"\x89PNG": "PNG image",
    b"\xff\xd8\xff": "JPEG image",
    b"GIF8": "GIF image",
    b"BM": "BMP image",
}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OVERRIDE_HINT = "give it with the manifest's `mpp` column or the `--mpp` argument"


def power_from_mpp(mpp: float) -> float:
    """Objective power of a scan at ``mpp`` microns per pixel: ``10 / mpp`` (10x is about
    1 um/px), snapped to the nearest standard objective when within 15 %."""
    raw = 10.0 / mpp
    nearest = min(STANDARD_POWERS, key=lambda p: abs(math.log(raw / p)))
    if abs(math.log(raw / nearest)) <= math.log(SNAP_FACTOR):
        return nearest
    return round(raw, 2)


def _integer(value) -> int:
    """An integer metadata value, 0 when missing or malformed."""
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 0


def _positive(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _why_unreadable(path: Path) -> str:
    """Explain why OpenSlide does not recognise ``path``: not a slide, or corrupt."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        return "the file is empty"
    for magic, kind in _PLAIN_IMAGES.items():
        if head.startswith(magic):
            return f"not a slide: a plain {kind}, which OpenSlide cannot read as a whole-slide image"
    if head[:4] in _TIFF_MAGIC:
        return ("not a slide OpenSlide can read: a TIFF that is corrupt, truncated or not "
                "tiled (whole-slide TIFFs are tiled pyramids)")
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return (f"corrupt slide: the contents are not a valid {path.suffix.lower()} file "
                "(OpenSlide recognises no slide format in it)")
    return "not a slide: OpenSlide recognises no slide format in this file"


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA over white; returns a new ``(h, w, 3)`` uint8 array."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(h, w, 3)`` to ``size`` = (w, h) with PIL's box (area) filter."""
    if (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(tuple(size), Image.BOX))


class Slide:
    """An open whole-slide image.  Use as a context manager or call :meth:`close`.

    ``mpp`` overrides the microns per level-0 pixel in the file's metadata;
    ``default_mpp`` is used only when the file states neither mpp nor objective power (a
    tool's ``--mpp``: a fallback, never an override); ``reader`` is ``"openslide"``,
    ``"tiles"`` or ``"reduced"`` (see the module doc).
    """

    def __init__(self, path, mpp: float | None = None, reader: str = "openslide", default_mpp: float | None = None):
        self.path = Path(path)
        if reader not in READERS:
            raise SlideError(self.path, f"reader must be one of {', '.join(READERS)}, got {reader!r}")
        reader = Reader(reader)
        if mpp is not None and _positive(mpp) is None:
            raise SlideError(self.path, f"mpp override must be a positive number, got {mpp!r}")
        if default_mpp is not None and _positive(default_mpp) is None:
            raise SlideError(self.path, f"fallback mpp must be a positive number, got {default_mpp!r}")
        if not self.path.exists():
            raise SlideError(self.path, "file not found")
        if self.path.is_dir():
            raise SlideError(self.path, "is a directory, not a slide file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            try:
                why = _why_unreadable(self.path)
            except OSError as exc:
                why = f"cannot read the file: {exc.strerror or exc}"
            raise SlideError(self.path, why) from None
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"OpenSlide cannot read this slide: {exc}") from None
        self._closed = False
        stat = self.path.stat()
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        props = self._osr.properties
        self.format: str = props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
        self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)
        self.level_count: int = self._osr.level_count
        self.level_dimensions = tuple(tuple(d) for d in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.reader = reader
        self._tiles = None
        if reader in (Reader.TILES, Reader.REDUCED):
            from h2g.io.tiles import TileSource

            self._tiles = TileSource.open(self.path, self.level_dimensions)
        self._overviews: dict[int, tuple[np.ndarray, int]] = {}
        self._overview_lock = threading.Lock()
        self._mpp_override = _positive(mpp)
        self._mpp_default = _positive(default_mpp)
        self._mpp_meta = _positive(props.get(openslide.PROPERTY_NAME_MPP_X)) or _positive(
            props.get(openslide.PROPERTY_NAME_MPP_Y))
        self._power_meta = _positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.bounds_offset: tuple[int, int] = (_integer(props.get(openslide.PROPERTY_NAME_BOUNDS_X)),
                                               _integer(props.get(openslide.PROPERTY_NAME_BOUNDS_Y)))
        """Level-0 (x, y) of the corner of OpenSlide's bounds (``openslide.bounds-x`` /
        ``-y``: the scanned area of MRXS and some other formats, where QuPath's
        coordinates start); (0, 0) for slides without bounds."""

    # -- scale -------------------------------------------------------------------------
    @property
    def has_scale(self) -> bool:
        """Whether mpp and objective power are known (from metadata, the override or the fallback)."""
        return bool(self._mpp_override or self._mpp_meta or self._power_meta or self._mpp_default)

    @property
    def mpp_source(self) -> str | None:
        """Where :attr:`mpp` comes from: ``override``, ``metadata``, ``objective power``
        (10 / power), ``fallback`` (``default_mpp``), or None (no scale)."""
        if self._mpp_override:
            return "override"
        if self._mpp_meta:
            return "metadata"
        if self._power_meta:
            return "objective power"
        return "fallback" if self._mpp_default else None

    def _no_scale(self) -> SlideError:
        return SlideError(self.path, "no microns-per-pixel or objective power in the slide's "
                                     f"metadata, so its magnification is unknown: {_OVERRIDE_HINT}")

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel: override > metadata > ``10 / objective power`` >
        fallback."""
        value = self._mpp_override or self._mpp_meta
        if value is None and self._power_meta is not None:
            value = 10.0 / self._power_meta
        if value is None:
            value = self._mpp_default
        if value is None:
            raise self._no_scale()
        return value

    @property
    def objective_power(self) -> float:
        """Objective power of level 0: derived from an ``mpp`` override
        (:func:`power_from_mpp`) > metadata > derived from the metadata's mpp.  An
        override says the file's scale is wrong, so the file's objective power is not
        trusted either: magnification follows the override."""
        if self._mpp_override is None and self._power_meta is not None:
            return self._power_meta
        return power_from_mpp(self.mpp)

    def downsample_for(self, magnification: float) -> float:
        """Level-0 pixels per output pixel at ``magnification`` (objective power / m)."""
        power = self.objective_power
        if not magnification or magnification <= 0:
            raise SlideError(self.path, f"magnification must be positive, got {magnification!r}")
        downsample = power / float(magnification)
        if downsample < 1.0 - 1e-6:
            raise SlideError(self.path, f"magnification {magnification:g}x is above the scan's "
                                        f"{power:g}x")
        return max(downsample, 1.0)

    def best_level_for(self, downsample: float) -> int:
        """The nearest finer level: the largest level downsample <= ``downsample``."""
        finer = [i for i, d in enumerate(self.level_downsamples) if d <= downsample + 1e-6]
        return max(finer, key=lambda i: self.level_downsamples[i]) if finer else 0

    # -- reading -----------------------------------------------------------------------
    def _read(self, location, level: int, size) -> np.ndarray:
        if self._closed:
            raise SlideError(self.path, "the slide has been closed")
        try:
            region = self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            forget(self)
            raise SlideError(self.path, f"cannot decode image data (corrupt tiles or an "
                                        f"unsupported compression): {exc}") from None
        if region.getchannel("A").getextrema()[0] == 255:  # opaque: PIL drops alpha fastest
            return np.asarray(region.convert("RGB"))
        return _to_rgb(np.asarray(region))

    def read_region(self, location, size, magnification: float) -> np.ndarray:
        """Read ``size`` = (w, h) output pixels at ``magnification`` whose top-left corner is
        level-0 ``location`` = (x, y).  Returns ``(h, w, 3)`` uint8 RGB.  Parts outside the
        slide are white; a region entirely outside is a :class:`SlideError`."""
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {w}x{h}")
        downsample = self.downsample_for(magnification)
        width0, height0 = w * downsample, h * downsample
        slide_w, slide_h = self.dimensions
        if x >= slide_w or y >= slide_h or x + width0 <= 0 or y + height0 <= 0:
            raise SlideError(self.path, f"region at ({x}, {y}) of {width0:g}x{height0:g} level-0 px "
                                        f"lies outside the slide ({slide_w}x{slide_h})")
        if self._tiles is not None:
            region = self._read_tiles(x, y, w, h, downsample)
            if region is not None:
                return region
        level = self.best_level_for(downsample)
        scale = downsample / self.level_downsamples[level]
        level_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return _resize(self._read((x, y), level, level_size), (w, h))

    def _read_tiles(self, x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray | None:
        """The region from decoded tiles when it lies on the pixel grid of a level at
        ``downsample`` or (``reader="reduced"``) of a level 2, 4 or 8 times finer, decoded
        at reduced scale; None when neither serves it (OpenSlide then reads it)."""
        if self._closed:
            raise SlideError(self.path, "the slide has been closed")
        for level, level_downsample in enumerate(self.level_downsamples):
            factor = downsample / level_downsample
            scale = round(factor)
            if abs(factor - scale) > 1e-9 or scale not in (1, 2, 4, 8) or (scale > 1 and self.reader != Reader.REDUCED):
                continue
            if scale > 1 and any(abs(d - downsample) < 1e-9 for d in self.level_downsamples):
                continue  # a level of its own exists: read that one
            step = level_downsample * scale  # level-0 px per output px
            if x % step or y % step:
                continue
            tiled = self._tiles.level(level, scale)
            if tiled is None:
                continue
            try:
                return tiled.read(int(x // step), int(y // step), w, h, scale)
            except Exception as exc:  # tifffile / imagecodecs raise many types on corrupt data
                raise SlideError(self.path, f"cannot decode image data of level {level}: {exc}") from None
        return None

    def read_level(self, level: int) -> np.ndarray:
        """The whole pyramid level ``level`` as ``(h, w, 3)`` uint8 RGB (large levels are
        read in blocks by :data:`BAND_THREADS` threads; with ``reader="tiles"`` /
        ``"reduced"``, a tiled level that is not too large to hold (:data:`LARGE_LEVEL_PIXELS`)
        is decoded tile row by tile row in one thread per core instead: the same pixels,
        without OpenSlide's ARGB round trip, which was most of the time of tissue detection
        on a full-size slide).  Its size is the level's: use :meth:`read_level_shrunk` for a
        view of a level too large to hold."""
        self._check_level(level)
        return self._read_level_shrunk(level, 1)

    def read_level_shrunk(self, level: int, factor: int) -> np.ndarray:
        """Level ``level`` box-filtered by the integer ``factor``: ``(ceil(h / factor),
        ceil(w / factor), 3)`` uint8, each pixel the mean of a ``factor`` x ``factor``
        block (blocks past the level's right / bottom edge are padded with white glass:
        the image spans ``factor x`` its size in level pixels).  Read region by region, so
        the memory it needs is the output plus a few blocks, and a large read shows a
        progress bar: how a slide without a pyramid gives its low-resolution views."""
        self._check_level(level)
        if int(factor) != factor or factor < 1:
            raise SlideError(self.path, f"shrink factor must be a positive integer, got {factor!r}")
        factor = int(factor)
        if factor > 1 and self._large(level) and factor >= self._overview_factor(level):
            return self._from_overview(level, factor)
        return self._read_level_shrunk(level, factor)

    def _large(self, level: int) -> bool:
        width, height = self.level_dimensions[level]
        return width * height > LARGE_LEVEL_PIXELS

    def _overview_factor(self, level: int) -> int:
        factor = 1
        while max(self.level_dimensions[level]) > OVERVIEW_SIDE * factor:
            factor *= 2
        return factor

    def _overview(self, level: int) -> tuple[np.ndarray, int]:
        """The level's overview (see :data:`OVERVIEW_SIDE`) and its factor, read once."""
        with self._overview_lock:
            if level not in self._overviews:
                factor = self._overview_factor(level)
                self._overviews[level] = (self._read_level_shrunk(level, factor, fast=True), factor)
            return self._overviews[level]

    def _from_overview(self, level: int, factor: int) -> np.ndarray:
        """:meth:`read_level_shrunk` of a large level from its overview (box filter)."""
        overview, first = self._overview(level)
        width, height = self.level_dimensions[level]
        out = (-(-width // factor), -(-height // factor))
        ratio = factor / first
        need = (math.ceil(out[0] * ratio), math.ceil(out[1] * ratio))
        if need[0] > overview.shape[1] or need[1] > overview.shape[0]:  # the last blocks reach past it: glass
            overview = np.pad(overview, ((0, max(0, need[1] - overview.shape[0])),
                                         (0, max(0, need[0] - overview.shape[1])), (0, 0)), constant_values=255)
        if ratio == 1:
            return overview[:out[1], :out[0]].copy()
        return np.asarray(Image.fromarray(overview).resize(out, Image.BOX, box=(0.0, 0.0, out[0] * ratio,
                                                                                 out[1] * ratio)))

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist (the slide has "
                                        f"{self.level_count} levels)")

    def _read_level_shrunk(self, level: int, factor: int, fast: bool = False) -> np.ndarray:
        """Level ``level`` box-filtered by the integer ``factor``, read and shrunk block by
        block in threads when it is larger than one block (see :meth:`read_level_shrunk`).
        ``fast``: OpenCV's area resize (4x faster than PIL's box filter; block means that
        may differ from PIL's by one grey level), for an overview."""
        width, height = self.level_dimensions[level]
        downsample = self.level_downsamples[level]
        out_size = (-(-width // factor), -(-height // factor))
        rows_per_band = max(factor, BAND_ROWS - BAND_ROWS % factor)  # whole output rows per block
        cols_per_block = max(factor, BLOCK_COLS - BLOCK_COLS % factor)
        # block origins are level-0 px (x downsample): exact only for an integer downsample,
        # so a level with another one is read in one call unless it is too large for that
        inexact = downsample != int(downsample) and width * height <= LARGE_LEVEL_PIXELS
        tiled = self._tiles.level(level) if self._tiles is not None else None
        if tiled is not None and not self._large(level) and width % factor == 0 and height % factor == 0 \
                and tiled.tile_height % factor == 0 and tiled.tile_width % factor == 0:
            try:  # the same pixels as OpenSlide (tests/test_tissue.py), without its ARGB round trip
                return tiled.read_level(factor, threads=max(BAND_THREADS, available_cores()), shrink=_resize,
                                        reduced=self.reader == Reader.REDUCED)
            except Exception as exc:  # tifffile / imagecodecs raise many types on corrupt data
                raise SlideError(self.path, f"cannot decode image data of level {level}: {exc}") from None
        if (height <= rows_per_band and width <= cols_per_block) or inexact:
            return self._shrunk_block(level, 0, 0, width, height, factor, fast)
        out = np.empty((out_size[1], out_size[0], 3), np.uint8)
        blocks = [(left, top) for top in range(0, height, rows_per_band) for left in range(0, width, cols_per_block)]

        def block(origin) -> None:  # OpenSlide is thread-safe and releases the GIL
            left, top = origin
            cols, rows = min(cols_per_block, width - left), min(rows_per_band, height - top)
            out[top // factor:top // factor + -(-rows // factor),
                left // factor:left // factor + -(-cols // factor)] = self._shrunk_block(level, left, top, cols, rows,
                                                                                        factor, fast)

        from tqdm import tqdm

        with ThreadPoolExecutor(BAND_THREADS) as pool, \
                tqdm(total=len(blocks), desc=f"reading {self.path.name} level {level}", unit="block", leave=False,
                     disable=True if len(blocks) <= PROGRESS_BLOCKS else
                     (None if SHOW_PROGRESS is None else not SHOW_PROGRESS)) as bar:
            for _ in pool.map(block, blocks):
                bar.update(1)
        return out

    def _shrunk_block(self, level: int, left: int, top: int, cols: int, rows: int, factor: int,
                      fast: bool = False) -> np.ndarray:
        """The level's ``cols`` x ``rows`` px at (``left``, ``top``) (level px) box-shrunk by
        ``factor``; a partial last block is padded with white to whole ``factor`` blocks.
        Read from the decoded tiles when the slide's reader serves this level (the same
        pixels as OpenSlide, without its ARGB round trip), else through OpenSlide."""
        plane = self._level_region(level, left, top, cols, rows)
        if factor == 1:
            return plane
        pad_rows, pad_cols = -rows % factor, -cols % factor
        if pad_rows or pad_cols:
            plane = np.pad(plane, ((0, pad_rows), (0, pad_cols), (0, 0)), constant_values=255)
        size = (plane.shape[1] // factor, plane.shape[0] // factor)
        if fast:
            import cv2  # opencv-python-headless: in the base install

            return cv2.resize(plane, size, interpolation=cv2.INTER_AREA)
        return _resize(plane, size)

    def _level_region(self, level: int, left: int, top: int, cols: int, rows: int) -> np.ndarray:
        """``rows`` x ``cols`` px of level ``level`` at (``left``, ``top``) in its own pixels."""
        tiled = self._tiles.level(level, 1) if self._tiles is not None else None
        if tiled is not None:
            if self._closed:
                raise SlideError(self.path, "the slide has been closed")
            try:
                return tiled.read(left, top, cols, rows, cache=False)  # each tile once
            except Exception as exc:  # tifffile / imagecodecs raise many types on corrupt data
                raise SlideError(self.path, f"cannot decode image data of level {level}: {exc}") from None
        downsample = self.level_downsamples[level]
        return self._read((round(left * downsample), round(top * downsample)), level, (cols, rows))

    def read_magnification(self, magnification: float) -> np.ndarray:
        """The whole slide at ``magnification``: the nearest finer level resized to
        ``round(level-0 size / downsample)`` (at least 1 px a side).  When that is an
        exact integer shrink of the level, blocks are read and shrunk in threads; a level
        larger than :data:`LARGE_LEVEL_PIXELS` (a slide without a pyramid) is first shrunk
        block by block by the largest integer factor that fits, so the whole level is
        never held at once."""
        downsample = self.downsample_for(magnification)
        size = tuple(max(1, round(d / downsample)) for d in self.dimensions)
        level = self.best_level_for(downsample)
        width, height = self.level_dimensions[level]
        factor = width // size[0]
        if (width, height) == (size[0] * factor, size[1] * factor):
            return self.read_level_shrunk(level, factor)  # box filter = exact block means
        factor = min(width // size[0], height // size[1])
        if self._large(level) and factor > 1:
            shrunk = self.read_level_shrunk(level, factor)  # spans factor x its size: crop the padding
            box = (0.0, 0.0, width / factor, height / factor)
            return np.asarray(Image.fromarray(shrunk).resize(size, Image.BOX, box=box))
        return _resize(self.read_level(level), size)

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Release the OpenSlide handle (and drop it from :func:`open_slide`'s cache)."""
        forget(self)
        if not self._closed:
            self._closed = True
            self._overviews.clear()
            self._osr.close()
            if self._tiles is not None:
                self._tiles.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, format={self.format!r}, dimensions={self.dimensions})"


_CACHE: dict[tuple[str, float | None], Slide] = {}
_CACHE_LOCK = threading.Lock()


def _key(path, mpp) -> tuple[str, float | None]:
    return str(Path(path).resolve()), (None if mpp is None else float(mpp))


def open_slide(path, mpp: float | None = None) -> Slide:
    """A shared :class:`Slide` for ``(path, mpp)``, opened once per process and reused
    (OpenSlide handles are safe to read from several threads, e.g. ``tf.numpy_function``
    readers).  A file changed on disk since it was opened is opened again.  Do not close
    shared handles while other readers may use them."""
    key = _key(path, mpp)
    with _CACHE_LOCK:
        slide = _CACHE.get(key)
        if slide is not None:
            try:
                stat = os.stat(key[0])
                fresh = (stat.st_mtime_ns, stat.st_size) == slide._stamp
            except OSError:
                fresh = False
            if fresh:
                return slide
            del _CACHE[key]
        slide = Slide(key[0], mpp=mpp)
        _CACHE[key] = slide
        return slide


def forget(slide: Slide) -> None:
    """Drop ``slide`` from :func:`open_slide`'s cache (after it closed or failed)."""
    with _CACHE_LOCK:
        for key, cached in list(_CACHE.items()):
            if cached is slide:
                del _CACHE[key]
