"""Pyramid levels of tiled TIFF slides (generic pyramidal TIFF, Aperio SVS) read tile by
tile with tifffile + imagecodecs, each tile decoded once per slide pass and cached.

Why: OpenSlide's ``read_region`` composites every request into a premultiplied ARGB
buffer, which :class:`h2g.io.slide.Slide` then turns back into RGB; for the patch-wise
pipeline, whose 10x patches line up with the 10x level's tiles, most of a patch's read
time is that round trip, not the JPEG decoding.  Here a region is cut straight out of
the decoded tiles (``os.pread`` of the tile bytes, tifffile's decoder, which releases
the GIL: reader threads scale with cores).  At a level's own resolution the pixels are
the ones OpenSlide returns (both decode with libjpeg-turbo; ``tests/test_tiles.py``
checks equality on the embedded cohort's slides and on a real Aperio JPEG slide).

Reduced-scale decoding: a JPEG tile in YCbCr can be decoded at 1/2, 1/4 or 1/8 of its
size by libjpeg's DCT scaling (PIL's ``draft``), which costs a fraction of a full decode.
:class:`h2g.io.slide.Slide` uses it, when asked (``reader="reduced"``), for a magnification
that has no pyramid level but is 2, 4 or 8 times coarser than one; the pixels then differ
slightly from OpenSlide's full-size read + area resize (measured in the README).

Only what can be served exactly is served: untiled pages, levels whose size does not
match OpenSlide's, and other compressions at reduced scale make :meth:`TileSource.level`
return None and the slide falls back to OpenSlide.
"""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

#: bytes of decoded tiles kept per slide (a 256 x 256 RGB tile is 192 KiB: 512 of them;
#: a 1024 x 1024 one 3 MiB: 32), so the cache is bounded whatever the slide's tile size
CACHE_BYTES = 96 << 20
REDUCED_SCALES = (2, 4, 8)


class TiledLevel:
    """One tiled pyramid level: regions cut from its decoded tiles, at full or reduced scale."""

    def __init__(self, fd: int, page, cache: "TileCache", key: int):
        self._fd = fd
        self._page = page
        self._cache = cache
        self._key = key
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_width, self.tile_height = int(page.tilewidth), int(page.tilelength)
        self.columns = -(-self.width // self.tile_width)
        self.rows = -(-self.height // self.tile_height)
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._tables = page.jpegtables
        name = getattr(page.compression, "name", str(page.compression))
        photometric = getattr(page.photometric, "name", str(page.photometric))
        #: DCT-scaled decoding needs plain JPEG in YCbCr (PIL would misread RGB-coded JPEG)
        self.reducible = name == "JPEG" and photometric == "YCBCR"

    def supports(self, scale: int) -> bool:
        return scale == 1 or (self.reducible and scale in REDUCED_SCALES
                              and self.tile_width % scale == 0 and self.tile_height % scale == 0)

    def _bytes(self, index: int) -> bytes:
        return os.pread(self._fd, int(self._counts[index]), int(self._offsets[index]))

    def _decode(self, index: int, scale: int) -> np.ndarray:
        data = self._bytes(index)
        th, tw = self.tile_height // scale, self.tile_width // scale
        if not len(data):  # a missing tile (sparse TIFF): glass
            return np.full((th, tw, 3), 255, np.uint8)
        if scale == 1:
            segment = self._page.decode(data, index, jpegtables=self._tables)[0]
            tile = np.asarray(segment).reshape(segment.shape[-3:])[..., :3]
        else:
            from PIL import Image

            stream = data if not self._tables else self._tables[:-2] + data[2:]  # tables + tile, one JPEG
            image = Image.open(io.BytesIO(stream))
            image.draft("RGB", (tw, th))
            tile = np.asarray(image.convert("RGB"))
        if tile.shape[:2] != (th, tw):  # edge tiles are stored full size; guard odd encoders
            full = np.full((th, tw, 3), 255, np.uint8)
            full[: min(th, tile.shape[0]), : min(tw, tile.shape[1])] = tile[:th, :tw]
            tile = full
        return tile

    def tile(self, column: int, row: int, scale: int = 1, cache: bool = True) -> np.ndarray:
        """The decoded tile ``(column, row)`` at 1/``scale`` size (cached unless ``cache``
        is false: a pass over a whole level reads each tile once)."""
        index = row * self.columns + column
        key = (self._key, scale, index)
        tile = self._cache.get(key)
        if tile is None:
            tile = self._decode(index, scale)
            if cache:
                self._cache.put(key, tile)
        return tile

    def read(self, x: int, y: int, width: int, height: int, scale: int = 1, cache: bool = True) -> np.ndarray:
        """``(height, width, 3)`` uint8 of this level shrunk by ``scale``, top-left at
        ``(x, y)`` in that shrunk level's pixels; outside the level is white (glass)."""
        out = np.full((height, width, 3), 255, np.uint8)
        tw, th = self.tile_width // scale, self.tile_height // scale
        level_w, level_h = self.width // scale, self.height // scale
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x0 >= x1 or y0 >= y1:
            return out
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for column in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self.tile(column, row, scale, cache)
                left, top = column * tw, row * th
                a, b = max(x0, left), min(x1, left + tw)
                c, d = max(y0, top), min(y1, top + th)
                out[c - y:d - y, a - x:b - x] = tile[c - top:d - top, a - left:b - left]
        return out


    def read_level(self, factor: int = 1, threads: int = 1, shrink=None, reduced: bool = False) -> np.ndarray:
        """The whole level, box-shrunk by the integer ``factor`` (its sides must be
        multiples of it, and so must the tile sides), as ``(height / factor, width /
        factor, 3)`` uint8: decoded one tile row at a time by ``threads`` threads (each
        tile once, bypassing the cache so that a whole-level read does not evict the
        patch reader's tiles) and each tile shrunk by ``shrink(tile, (w, h))``
        (:func:`h2g.io.slide._resize`, PIL's box filter, separable with exact weights for
        an integer factor: whole output pixels per tile, so the same pixels as shrinking
        the whole level at once; tested).  ``reduced``: where the level's JPEG tiles can
        be decoded at 1/``factor`` size (:meth:`supports`), they are, and nothing is
        shrunk: most of the decoding and the shrink are skipped, but the pixels are
        libjpeg's scaled IDCT, not block means (apart by a few grey levels)."""
        from concurrent.futures import ThreadPoolExecutor

        if self.width % factor or self.height % factor or self.tile_height % factor:
            raise ValueError(f"level of {self.width}x{self.height} px in {self.tile_height} px tile rows cannot be "
                             f"shrunk by {factor} row by row")
        out = np.empty((self.height // factor, self.width // factor, 3), np.uint8)

        if factor > 1 and self.tile_width % factor:
            raise ValueError(f"tiles {self.tile_width} px wide cannot be shrunk by {factor} tile by tile")

        scale = factor if reduced and factor > 1 and self.supports(factor) else 1

        def tile_row(row: int) -> None:  # each tile shrunk on its own, while it is in cache
            top = row * self.tile_height
            rows = min(self.tile_height, self.height - top)
            for column in range(self.columns):
                left = column * self.tile_width
                cols = min(self.tile_width, self.width - left)
                tile = self._decode(row * self.columns + column, scale)[:rows // scale, :cols // scale]
                if factor > scale:
                    tile = shrink(np.ascontiguousarray(tile), (cols // factor, rows // factor))
                out[top // factor:(top + rows) // factor, left // factor:(left + cols) // factor] = tile

        if threads <= 1:
            for row in range(self.rows):
                tile_row(row)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(tile_row, range(self.rows)))
        return out


class TileCache:
    """A thread-safe LRU of decoded tiles holding at most ``capacity`` bytes (two threads
    may decode the same tile at once; both results are equal, the later one is kept)."""

    def __init__(self, capacity: int = CACHE_BYTES):
        self.capacity = int(capacity)
        self.nbytes = 0
        self._tiles: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key, tile) -> None:
        with self._lock:
            old = self._tiles.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._tiles[key] = tile
            self.nbytes += tile.nbytes
            while self.nbytes > self.capacity and len(self._tiles) > 1:
                self.nbytes -= self._tiles.popitem(last=False)[1].nbytes


class TileSource:
    """The tiled levels of a TIFF-based slide whose pyramid matches OpenSlide's levels
    (``level_dimensions``, (w, h) per level); :meth:`open` gives None when the file is
    not such a slide."""

    def __init__(self, path: Path, tif, levels: list, cache_bytes: int = CACHE_BYTES):
        self.path = Path(path)
        self._tif = tif
        self._fd = os.open(str(path), os.O_RDONLY)
        self._cache = TileCache(cache_bytes)
        self._levels = [TiledLevel(self._fd, page, self._cache, k) if page is not None else None
                        for k, page in enumerate(levels)]

    @classmethod
    def open(cls, path, level_dimensions, cache_bytes: int = CACHE_BYTES) -> "TileSource | None":
        try:
            import tifffile
        except ImportError:
            return None
        try:
            tif = tifffile.TiffFile(str(path))
        except Exception:  # not a TIFF (or unreadable): OpenSlide reads it
            return None
        try:
            series = tif.series[0]
            pages = [lv.pages[0] if lv.pages else None for lv in series.levels]
        except Exception:
            tif.close()
            return None
        levels = []
        for k, size in enumerate(level_dimensions):
            page = pages[k] if k < len(pages) else None
            usable = (page is not None and page.is_tiled and page.samplesperpixel in (3, 4)
                      and page.bitspersample == 8 and (page.imagewidth, page.imagelength) == tuple(size)
                      and page.planarconfig == 1)
            if usable:
                try:
                    page.decode  # noqa: B018  (tifffile raises when it has no decoder for the compression)
                except Exception:
                    usable = False
            levels.append(page if usable else None)
        if not any(levels):
            tif.close()
            return None
        return cls(path, tif, levels, cache_bytes)

    def level(self, index: int, scale: int = 1) -> TiledLevel | None:
        """Level ``index`` when it can be read at 1/``scale`` from its tiles, else None."""
        level = self._levels[index] if 0 <= index < len(self._levels) else None
        return level if level is not None and level.supports(scale) else None

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._tif.close()
