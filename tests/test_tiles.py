"""Reading patches from decoded TIFF tiles (``Slide(..., reader="tiles")``, h2g.io.tiles):
the same pixels as OpenSlide on a level's own grid (embedded cohort slides, a real Aperio
JPEG slide and a real Aperio JPEG 2000 slide), reduced-scale JPEG decoding close to
OpenSlide + area resize, each tile decoded once per pass, safe from several threads, and
OpenSlide wherever tiles cannot serve a region exactly."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from h2g.io import tiles
from h2g.io.slide import Slide


@pytest.fixture(scope="module")
def cohort_slide(tiny_cohort):
    from h2g.io.manifest import load_manifest

    return load_manifest(tiny_cohort).records[0].slide_path


def _pairs(path, **kw):
    return Slide(path, **kw), Slide(path, reader="tiles", **kw)


def test_level_grid_reads_equal_openslide_and_decode_each_tile_once(cohort_slide, monkeypatch):
    plain, tiled = _pairs(cohort_slide)
    with plain, tiled:
        assert tiled._tiles is not None
        level = tiled._tiles.level(1)
        w, h = tiled.dimensions
        decoded = []
        real_decode = tiles.TiledLevel._decode
        monkeypatch.setattr(tiles.TiledLevel, "_decode", lambda self, i, s: decoded.append((i, s)) or real_decode(self, i, s))
        # 10x patches on the 10x level's grid: aligned with tiles, straddling four tiles, at the slide's edge
        corners = [(0, 0), (1024, 1024), (4 * 100, 4 * 300), (w - 4 * 100, h - 4 * 60), (4 * 7, 4 * 250)]
        for corner in corners:
            np.testing.assert_array_equal(tiled.read_region(corner, (256, 256), 10),
                                          plain.read_region(corner, (256, 256), 10), err_msg=str(corner))
        assert decoded and len(decoded) == len(set(decoded))  # the cache: no tile decoded twice
        # the same at level 0 (40x)
        np.testing.assert_array_equal(tiled.read_region((300, 500), (200, 100), 40),
                                      plain.read_region((300, 500), (200, 100), 40))
        assert level.tile_width and tiled.reader == "tiles" and plain._tiles is None


def test_off_grid_regions_fall_back_to_openslide(cohort_slide, monkeypatch):
    plain, tiled = _pairs(cohort_slide)
    with plain, tiled:
        monkeypatch.setattr(tiles.TiledLevel, "read", lambda *a, **k: pytest.fail("tiles used off the grid"))
        for corner, magnification in (((1, 2), 10), ((1000, 1002), 10), ((10, 10), 7.3)):
            np.testing.assert_array_equal(tiled.read_region(corner, (64, 64), magnification),
                                          plain.read_region(corner, (64, 64), magnification))


def test_reduced_scale_decoding_is_close_to_openslide_and_area_resize(cohort_slide, monkeypatch):
    plain, tiled = _pairs(cohort_slide)
    with plain, tiled:
        used = []
        real_read = tiles.TiledLevel.read
        monkeypatch.setattr(tiles.TiledLevel, "read", lambda self, *a: used.append(a[-1]) or real_read(self, *a))
        # 20x has no level of its own on a 40x / 10x / 2.5x pyramid: level 0 decoded at 1/2
        got = tiled.read_region((2048, 2048), (256, 256), 20)
        want = plain.read_region((2048, 2048), (256, 256), 20)
        assert used == [2]
        diff = np.abs(got.astype(int) - want)
        assert diff.mean() < 2.0 and diff.max() < 40
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_threads_read_the_same_pixels(cohort_slide):
    with Slide(cohort_slide, reader="tiles") as tiled:
        corners = [(4 * 64 * i, 4 * 64 * j) for i in range(6) for j in range(6)]
        serial = [tiled.read_region(c, (256, 256), 10) for c in corners]
    with Slide(cohort_slide, reader="tiles") as tiled, ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda c: tiled.read_region(c, (256, 256), 10), corners))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.realdata
@pytest.mark.parametrize("name, mpp, magnification", [
    ("cmu_small_region.svs", None, 20),             # Aperio JPEG (RGB-coded, shared tables), 240 px tiles
    ("tcga-cr-7395-01a-01-ts1.svs", 0.25, 20),      # Aperio JPEG 2000, level 1
])
def test_real_aperio_slides_read_identically(real_data, name, mpp, magnification):
    plain, tiled = _pairs(real_data / "slides" / name, mpp=mpp)
    with plain, tiled:
        assert tiled._tiles is not None
        w, h = tiled.dimensions
        step = round(tiled.downsample_for(magnification))
        for corner in ((0, 0), (step * 100, step * 77), (w - step * 50, h - step * 30)):
            np.testing.assert_array_equal(tiled.read_region(corner, (256, 256), magnification),
                                          plain.read_region(corner, (256, 256), magnification), err_msg=str(corner))


def test_unknown_reader_is_refused(cohort_slide):
    from h2g.core.errors import SlideError

    with pytest.raises(SlideError, match="reader must be one of"):
        Slide(cohort_slide, reader="fast")
