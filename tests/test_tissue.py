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
    saturation,
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
    high, low = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    every_pair = np.stack([high, low, np.minimum(high, low)], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(saturation(every_pair), cv2_saturation(every_pair))
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    np.testing.assert_array_equal(saturation(noise), cv2_saturation(noise))


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
