"""Write tiled, pyramidal TIFF files that OpenSlide opens as "generic-tiff".

Each pyramid level is its own top-level page (not a SubIFD: OpenSlide's generic TIFF
reader only looks at top-level directories; reduced levels carry NewSubfileType=1, without
which OpenSlide 4 sees level 0 only), tiled, JPEG-compressed by default, with the
resolution stored in pixels per centimetre so that OpenSlide reports microns per pixel.

Two entry points:
- :func:`write_pyramid` for an image held in memory (test slides, masks);
- :func:`write_pyramid_tiles` for images too large to hold: the caller gives a function
  that renders any level-0 region; level 0 is written tile row by tile row and each
  further level is reduced from the previous one (kept in a temporary file), so memory
  stays bounded by a few tile rows.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile
from PIL import Image


def _resolution(mpp: float, downsample: float):
    # pixels per centimetre: 1 cm = 10_000 um
    ppcm = 10_000.0 / (mpp * downsample)
    return (ppcm, ppcm), "CENTIMETER"


def default_downsamples(width: int, height: int, min_side: int = 512) -> list[int]:
    """Level downsamples 1, 4, 16, ... while the level's long side stays >= ``min_side``."""
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
    downsamples = list(downsamples or default_downsamples(w, h))
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for ds in downsamples:
            level = image if ds == 1 else _shrink(image, ds)
            kw = _tile_kwargs(level, tile, compression, quality)
            kw["subfiletype"] = 0 if ds == 1 else 1  # OpenSlide wants reduced levels marked
            if mpp is not None:
                kw["resolution"], kw["resolutionunit"] = _resolution(mpp, ds)
            tif.write(level, **kw)
    return path


def _reduce(strip: np.ndarray, factor: int, fill: int) -> np.ndarray:
    """``strip`` reduced ``factor`` times: box average for RGB, centre sample for masks.
    Ragged edges are padded with ``fill`` first, so sizes round up like the levels'."""
    h, w = strip.shape[:2]
    pad = ((0, -h % factor), (0, -w % factor)) + ((0, 0),) * (strip.ndim - 2)
    if any(p[1] for p in pad):
        strip = np.pad(strip, pad, constant_values=fill)
    if strip.ndim == 2:
        return strip[factor // 2 :: factor, factor // 2 :: factor]
    size = (strip.shape[1] // factor, strip.shape[0] // factor)
    return np.asarray(Image.fromarray(strip).resize(size, Image.BOX))


class _LevelFile:
    """A pyramid level kept in a raw scratch file: rows are appended in order, then read
    back strip by strip (plain file I/O, so the level never sits in process memory)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.shape = shape
        self.row_bytes = int(np.prod(shape[1:]))
        self.handle = open(path, "w+b")

    def append(self, rows: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(rows, np.uint8).tobytes())

    def read(self, y: int, rows: int) -> np.ndarray:
        self.handle.seek(y * self.row_bytes)
        data = self.handle.read(rows * self.row_bytes)
        return np.frombuffer(data, np.uint8).reshape((rows,) + self.shape[1:])

    def close(self) -> None:
        self.handle.close()


def write_pyramid_tiles(
    path,
    size: tuple[int, int],
    render: Callable[[int, int, int, int], np.ndarray],
    *,
    mpp: float = 0.25,
    downsamples: Sequence[int] | None = None,
    tile: int = 256,
    quality: int = 90,
    channels: int = 3,
    block: int = 4096,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
) -> Path:
    """Write a large pyramid without holding it in memory.

    ``render(x, y, w, h)`` returns the level-0 region: ``(h, w, 3)`` uint8 RGB, or
    ``(h, w)`` uint8 when ``channels`` is 1 (masks: lossless zlib instead of JPEG).
    Level 0 is rendered one tile row at a time, in blocks of at most ``block`` columns.
    Each further level is reduced from the previous one (box filter for RGB, centre
    sample for masks) while that one is written, and kept in a temporary raw file beside
    ``path`` until its own turn, so memory stays at a few tile rows whatever the size.
    ``downsamples`` (default: powers of 4 down to ~512 px) must start at 1, each an
    integer multiple of the one before, the ratio dividing ``tile``.  Edge tiles are
    padded with white (RGB) or 0 (masks).  ``progress`` is called with the number of
    tiles written after each tile row.

    ``workers`` > 1 renders level 0's blocks in that many processes (``render`` must be
    picklable; it is sent to each worker once) a tile row ahead of the writer, and
    compresses tiles in as many threads: the same file, byte for byte, whatever
    ``workers`` is (blocks and tiles do not depend on it; tested).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    downsamples = [int(d) for d in (downsamples or default_downsamples(width, height))]
    ratios = [b // a for a, b in zip(downsamples, downsamples[1:])]
    if downsamples[0] != 1 or any(a * r != b or tile % r for a, b, r in
                                  zip(downsamples, downsamples[1:], ratios)):
        raise ValueError(f"downsamples {downsamples} must start at 1, each an integer "
                         f"multiple of the previous, the ratio dividing tile={tile}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    fill = 255 if channels == 3 else 0
    depth = (channels,) if channels == 3 else ()
    block = max(tile, block - block % tile)

    def level_shape(ds: int) -> tuple[int, ...]:
        return (-(-height // ds), -(-width // ds)) + depth

    def level0_strip(y: int, rows: int) -> np.ndarray:
        strip = np.empty((rows, width) + depth, np.uint8)
        for x in range(0, width, block):
            strip[:, x : x + block] = render(x, y, min(block, width - x), rows)
        return strip

    pool = None
    if workers > 1:  # level 0's strips rendered ahead in processes, in order
        import multiprocessing
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_set_renderer, initargs=(render,))
        pending: deque = deque()
        rows_of = [(y, min(tile, height - y)) for y in range(0, height, tile)]
        upcoming = iter(rows_of)

        def submit_strip() -> None:
            nxt = next(upcoming, None)
            if nxt is not None:
                y, rows = nxt
                pending.append((y, [pool.submit(_render_block, x, y, min(block, width - x), rows)
                                    for x in range(0, width, block)]))

        def level0_strip(y: int, rows: int) -> np.ndarray:  # noqa: F811 (the parallel version)
            while len(pending) < 2:
                before = len(pending)
                submit_strip()
                if len(pending) == before:
                    break
            at, blocks = pending.popleft()
            assert at == y, (at, y)
            strip = np.empty((rows, width) + depth, np.uint8)
            for x, job in zip(range(0, width, block), blocks):
                strip[:, x : x + block] = job.result()
            submit_strip()
            return strip

    def tiles(k: int, source, store):
        lh, lw = level_shape(downsamples[k])[:2]
        for y in range(0, lh, tile):
            rows = min(tile, lh - y)
            strip = part = None  # let the previous strip go before making the next
            strip = np.ascontiguousarray(source(y, rows), dtype=np.uint8)
            if store is not None:
                store.append(_reduce(strip, ratios[k], fill))
            for x in range(0, lw, tile):
                part = strip[:, x : x + tile]
                if part.shape[:2] != (tile, tile):  # edge tile: pad
                    part = np.pad(part, ((0, tile - rows), (0, tile - part.shape[1]))
                                  + ((0, 0),) * len(depth), constant_values=fill)
                yield part
            if progress is not None:
                progress(-(-lw // tile))

    if channels == 3:
        codec = dict(compression="jpeg", compressionargs={"level": quality}, photometric="rgb")
    else:
        codec = dict(compression="zlib", photometric="minisblack")
    if workers > 1:
        codec["maxworkers"] = int(workers)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid-") as scratch, \
            tifffile.TiffWriter(path, bigtiff=True) as tif:
        source, stores = level0_strip, []
        try:
            for k, ds in enumerate(downsamples):
                store = None
                if k + 1 < len(downsamples):
                    store = _LevelFile(Path(scratch) / f"level{k + 1}.raw",
                                       level_shape(downsamples[k + 1]))
                    stores.append(store)
                res, unit = _resolution(mpp, ds)
                tif.write(
                    tiles(k, source, store),
                    shape=level_shape(ds),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    resolution=res,
                    resolutionunit=unit,
                    metadata=None,
                    subfiletype=0 if ds == 1 else 1,  # OpenSlide wants reduced levels marked
                    **codec,
                )
                if store is not None:
                    source = store.read
        finally:
            for store in stores:
                store.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return path


_RENDER = None  # a worker process's render function (write_pyramid_tiles with workers > 1)


def _set_renderer(render) -> None:
    global _RENDER
    _RENDER = render


def _render_block(x: int, y: int, w: int, h: int) -> np.ndarray:
    return np.ascontiguousarray(_RENDER(x, y, w, h), dtype=np.uint8)
