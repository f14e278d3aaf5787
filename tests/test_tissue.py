"""h2g.tiling.tissue against OpenCV (saturation, Otsu), scipy (closing) and on hand-built slides."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from synthetic import TISSUE_RGB, make_slide

from h2g.io.pyramid import write_pyramid
from h2g.io.slide import Slide
from h2g.tiling.tissue import (
    TissueMask,
    close_mask,
    detect_tissue,
    otsu_threshold,
    otsu_tissue,
    pen_ink,
    saturation,
    saturation_numpy,
)


def cv2_saturation(image):
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)[..., 1]


def cv2_otsu(values):
    return int(cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0])


def test_saturation_by_hand():
    pixels = np.array([[[255, 255, 255], [0, 0, 0], [200, 80, 150], [255, 235, 235], [255, 234, 240]]],
                      np.uint8)
    # 255 * (max - min) / max: 0, 0 (black), 153, 20, 21
    np.testing.assert_array_equal(saturation(pixels)[0], [0, 0, 153, 20, 21])


def test_saturation_matches_opencv():
    """Both implementations: the numpy fixed-point formula equals OpenCV's HSV for every
    (max, min) pair, and saturation() (OpenCV) equals it."""
    high, low = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    every_pair = np.stack([high, low, np.minimum(high, low)], axis=-1).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    for image in (every_pair, noise):
        np.testing.assert_array_equal(saturation_numpy(image), cv2_saturation(image))
        np.testing.assert_array_equal(saturation(image), saturation_numpy(image))
    np.testing.assert_array_equal(saturation(every_pair[:1, :5]), saturation_numpy(every_pair[:1, :5]))  # a view


def test_pen_ink_in_uint8_equals_the_int16_formula():
    """pen_ink's saturating uint8 arithmetic gives the mask of the plain int16 formula
    (written out here) on every (r, g) pair with several b, and on noise."""
    def reference(rgb, margin=12, dark=70):
        r, g, b = (rgb[..., k].astype(np.int16) for k in range(3))
        high = np.maximum(np.maximum(r, g), b)
        return (g > r + margin) | ((high < dark) & (high - np.minimum(np.minimum(r, g), b) < 15))

    r, g = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for b in (0, 13, 60, 69, 70, 200, 255):
        image = np.stack([r, g, np.full_like(r, b)], axis=-1).astype(np.uint8)
        np.testing.assert_array_equal(pen_ink(image), reference(image), err_msg=f"b={b}")
    noise = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pen_ink(noise), reference(noise))
    np.testing.assert_array_equal(pen_ink(noise, margin=0, dark=200), reference(noise, 0, 200))


@pytest.mark.parametrize("size", [3, 5])
def test_closing_matches_scipy(size):
    mask = np.random.default_rng(size).random((120, 90)) > 0.75
    mask[0, :] = mask[:, -1] = True  # tissue touching the border
    structure = np.ones((size, size), bool)  # scipy: beyond the border adds nothing, erodes nothing
    dilated = ndimage.binary_dilation(mask, structure, border_value=0)
    expected = ndimage.binary_erosion(dilated, structure, border_value=1)
    np.testing.assert_array_equal(close_mask(mask, size), expected)


def test_otsu_matches_opencv():
    rng = np.random.default_rng(1)
    for _ in range(10):
        glass = rng.normal(rng.uniform(0, 40), rng.uniform(1, 10), 4000)
        tissue = rng.normal(rng.uniform(80, 220), rng.uniform(5, 40), int(rng.integers(500, 4000)))
        values = np.clip(np.concatenate([glass, tissue]), 0, 255).astype(np.uint8)
        assert otsu_threshold(values) == cv2_otsu(values)
    uniform = rng.integers(0, 256, 5000).astype(np.uint8)
    assert otsu_threshold(uniform) == cv2_otsu(uniform)


def test_otsu_tissue_separates_two_populations():
    image = np.full((64, 64, 3), (240, 238, 236), np.uint8)  # near-white glass
    image[16:48, 8:40] = TISSUE_RGB
    image[0, 0] = (235, 225, 230)  # a faint smear, still on the glass side
    expected = np.zeros((64, 64), bool)
    expected[16:48, 8:40] = True
    np.testing.assert_array_equal(otsu_tissue(image), expected)


def test_detect_tissue_on_a_synthetic_slide(tmp_path):
    """A tissue block aligned to the 1.25x grid (32 level-0 px) is found exactly."""
    path = make_slide(tmp_path / "s.tiff", (4096, 3072), pattern="tissue", tissue=(1024, 768, 2048, 1536))
    with Slide(path) as slide:
        tissue = detect_tissue(slide)
    assert isinstance(tissue, TissueMask) and tissue.downsample == 32
    expected = np.zeros((96, 128), bool)
    expected[24:72, 32:96] = True
    np.testing.assert_array_equal(tissue.mask, expected)
    assert tissue.fraction == pytest.approx(0.25)


def test_threshold_is_strict_and_closing_fills_gaps(tmp_path):
    """Saturation exactly 20 is glass, 21 is tissue; one-pixel gaps at 1.25x are closed,
    specks survive (closing only fills)."""
    image = np.full((2048, 2048, 3), 255, np.uint8)
    image[0:256, 0:256] = (255, 235, 235)      # saturation 20
    image[0:256, 512:768] = (255, 234, 240)    # saturation 21
    image[1024:1536, 1024:1536] = TISSUE_RGB   # a block with a 1-px (32 level-0 px) slit
    image[1024:1536, 1280:1312] = 255
    image[1792:1824, 320:352] = TISSUE_RGB     # a one-pixel speck
    path = write_pyramid(tmp_path / "t.tiff", image, mpp=0.25, downsamples=[1, 8], compression="zlib")
    with Slide(path) as slide:
        raw = detect_tissue(slide, closings=())
        closed = detect_tissue(slide)
    assert not raw.mask[0:8, 0:8].any() and raw.mask[0:8, 16:24].all()
    assert not raw.mask[32:48, 40].any()
    assert closed.mask[32:48, 32:48].all()
    assert raw.mask[56, 10] and closed.mask[56, 10] and closed.mask.sum() == raw.mask.sum() + 16


@pytest.mark.realdata
def test_real_slide_tissue(real_data):
    """CMU-1-Small-Region is about two-thirds glass."""
    with Slide(real_data / "slides" / "cmu_small_region.svs") as slide:
        tissue = detect_tissue(slide)
    assert tissue.downsample == 16 and tissue.mask.shape == (185, 139)
    assert 0.25 < tissue.fraction < 0.45


@pytest.mark.realdata
def test_real_thumbnail_otsu(real_data):
    thumb = np.asarray(Image.open(real_data / "camelyon16_tumor_110" / "tumor_110_thumbnail.png").convert("RGB"))
    sat = saturation(thumb)
    assert otsu_threshold(sat) == cv2_otsu(sat)
    mask = otsu_tissue(thumb)
    assert 0.05 < mask.mean() < 0.95
    np.testing.assert_array_equal(mask, sat > cv2_otsu(sat))


# ---------------------------------------------------------------------------- the fast read path
def _tissue_both_ways(path, mpp=None):
    """detect_tissue through OpenSlide (training's reader) and through decoded tiles
    (deployment's), and the level the 1.25x plane is shrunk from, read both ways."""
    with Slide(path, mpp=mpp) as plain, Slide(path, mpp=mpp, reader="tiles") as tiled:
        level = plain.best_level_for(plain.downsample_for(1.25))
        return (detect_tissue(plain), detect_tissue(tiled), plain.read_level(level), tiled.read_level(level),
                tiled._tiles is not None and tiled._tiles.level(level) is not None)


def test_tiles_give_the_same_tissue_mask_on_the_cohort(tiny_cohort, monkeypatch):
    """On every slide of the tiny cohort: the whole level read from tiles equals
    OpenSlide's pixel for pixel, so the tissue mask is the same; and the tiles path is
    the one taken (OpenSlide's band reader is never called)."""
    from h2g.io.manifest import load_manifest

    for record in load_manifest(tiny_cohort).records:
        plain_mask, tiled_mask, plain_level, tiled_level, served = _tissue_both_ways(record.slide_path)
        assert served, record.slide_id
        np.testing.assert_array_equal(tiled_level, plain_level, err_msg=record.slide_id)
        np.testing.assert_array_equal(tiled_mask.mask, plain_mask.mask, err_msg=record.slide_id)
        assert tiled_mask.downsample == plain_mask.downsample and 0.05 < plain_mask.fraction < 0.95
    with Slide(load_manifest(tiny_cohort).records[0].slide_path, reader="tiles") as tiled:
        monkeypatch.setattr(Slide, "_read", lambda *a, **k: pytest.fail("OpenSlide read a tiled level"))
        detect_tissue(tiled)


def test_tiles_shrink_a_level_in_whole_tile_rows_like_the_whole_level(tmp_path):
    """A level shrunk by 2 and 4 tile by tile (edge tiles cut) equals PIL's box filter of
    the whole level read by OpenSlide; a factor that does not divide the tile side is
    refused."""
    from h2g.io.slide import _resize
    from h2g.io.tiles import TileSource

    path = make_slide(tmp_path / "noise.tiff", size=(1280, 1152), pattern="noise", downsamples=(1, 2))
    with Slide(path) as plain:
        level = plain.read_level(1)  # 640 x 576: 3 x 3 tiles of 256, the last ones cut
        source = TileSource.open(path, plain.level_dimensions)
        try:
            tiled = source.level(1)
            for factor in (1, 2, 4):
                want = _resize(level, (640 // factor, 576 // factor))
                np.testing.assert_array_equal(tiled.read_level(factor, threads=2, shrink=_resize), want)
            with pytest.raises(ValueError, match="cannot be shrunk by 3"):
                tiled.read_level(3, shrink=_resize)
        finally:
            source.close()


def test_reduced_reader_decodes_a_shrunk_level_at_reduced_scale(tmp_path, monkeypatch):
    """reader="reduced": a JPEG level shrunk by 2 or 4 is decoded at 1/2 or 1/4 size
    (libjpeg's DCT scaling) and not shrunk afterwards: the same pixels as the level's
    tiles decoded at that scale one by one, within a few grey levels of the box filter of
    OpenSlide's level (what training sees); an uncompressed level cannot be decoded at
    reduced scale and gets the box filter exactly."""
    from h2g.io import tiles
    from h2g.io.slide import _resize
    from h2g.io.tiles import TileSource

    jpeg = make_slide(tmp_path / "jpeg.tiff", size=(2048, 1536), downsamples=(1, 2))
    raw = make_slide(tmp_path / "raw.tiff", size=(2048, 1536), downsamples=(1, 2), compression=None)
    for path, reducible in ((jpeg, True), (raw, False)):
        with Slide(path) as plain:
            level = plain.read_level(1)  # 1024 x 768: 4 x 3 tiles of 256
            source = TileSource.open(path, plain.level_dimensions)
            try:
                tiled = source.level(1)
                assert tiled.reducible == reducible
                for factor in (2, 4):
                    box = _resize(level, (1024 // factor, 768 // factor))
                    got = tiled.read_level(factor, threads=2, shrink=_resize, reduced=True)
                    if not reducible:
                        np.testing.assert_array_equal(got, box)
                        continue
                    by_tile = np.concatenate([np.concatenate([tiled.tile(c, r, factor) for c in range(4)], axis=1)
                                              for r in range(3)], axis=0)
                    np.testing.assert_array_equal(got, by_tile[:768 // factor, :1024 // factor])
                    assert got.shape == box.shape == (768 // factor, 1024 // factor, 3)
                    diff = np.abs(got.astype(int) - box.astype(int))
                    assert diff.mean() < 2.0 and diff.max() < 48, (factor, diff.mean(), diff.max())
                    assert not np.array_equal(got, box)  # really the scaled decode, not the box filter
            finally:
                source.close()
    # through the Slide: the 1.25x plane of tissue detection comes from the reduced decode
    with Slide(jpeg, reader="reduced") as reduced, Slide(jpeg, reader="tiles") as exact:
        level = exact.best_level_for(exact.downsample_for(1.25))
        calls = []
        real = tiles.TiledLevel.read_level
        monkeypatch.setattr(tiles.TiledLevel, "read_level",
                            lambda self, *a, **k: calls.append(k.get("reduced")) or real(self, *a, **k))
        a, b = reduced.read_magnification(1.25), exact.read_magnification(1.25)
        assert calls == [True, False] and a.shape == b.shape and level >= 0
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


@pytest.mark.realdata
@pytest.mark.parametrize("name, mpp", [("cmu_small_region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)])
def test_tiles_give_the_same_tissue_mask_on_real_slides(real_data, name, mpp):
    plain_mask, tiled_mask, plain_level, tiled_level, served = _tissue_both_ways(real_data / "slides" / name, mpp)
    assert served
    np.testing.assert_array_equal(tiled_level, plain_level)
    np.testing.assert_array_equal(tiled_mask.mask, plain_mask.mask)
