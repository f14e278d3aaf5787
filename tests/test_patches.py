"""h2g.tiling.grid: label rules on hand-made masks, area fractions, annotation loading."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from synthetic import make_mask, make_slide, mask_image

from h2g.core.errors import AnnotationError
from h2g.io.annotation import Annotation, load_annotation
from h2g.io.slide import Slide
from h2g.tiling.grid import area_fractions, build_patch_grid, class_area_fractions
from h2g.tiling.tissue import TissueMask, detect_tissue


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 4096 x 4096 40x slide: a 4 x 4 grid of 1024 px (256 px at 10x) patches."""
    path = make_slide(tmp_path_factory.mktemp("patches") / "s.tiff", (4096, 4096), downsamples=(1, 4))
    with Slide(path) as opened:
        yield opened


def hand_masks():
    """Tissue at downsample 32 (32 x 32 px per patch), tumour at 4 (256 x 256 per patch)."""
    tissue = np.zeros((128, 128), bool)
    tissue[0:32, 0:128] = True          # row 0: all tissue
    tissue[32:40, 0:32] = True          # (1, 0): exactly 25 % tissue
    tissue[32:40, 32:64] = True         # (1, 1): 25 % + one pixel
    tissue[40, 32] = True
    tumour = np.zeros((1024, 1024), bool)
    tumour[0:64, 0:256] = True          # (0, 0): exactly 25 % -> discarded
    tumour[0:64, 256:512] = True        # (0, 1): 25 % + one pixel -> tumour
    tumour[64, 256] = True
    tumour[0, 768] = True               # (0, 3): one pixel -> discarded; (0, 2) stays clean
    tumour[256:512, 0:512] = True       # (1, 0) background whatever its tumour; (1, 1) tumour
    return TissueMask(tissue, 32.0), Annotation(tumour, 4.0, path=None)


def test_label_rules(slide):
    tissue, annotation = hand_masks()
    grid = build_patch_grid(slide, tissue, annotation)
    assert grid.step == 1024 and grid.grid_shape == (4, 4) and grid.patch_size == 256
    assert grid.magnification == 10.0
    assert grid.coords.dtype == np.int64 and grid.labels.dtype == np.int8
    assert grid.coords.tolist() == [[1024, 0], [2048, 0], [1024, 1024]]
    assert grid.labels.tolist() == [1, 0, 1]
    assert grid.counts == {"tumour": 2, "non_tumour": 1, "discarded": 2, "background": 11}
    assert grid.indices_of(1).tolist() == [0, 2] and grid.indices_of(0).tolist() == [1]


def test_thresholds_are_parameters(slide):
    tissue, annotation = hand_masks()
    grid = build_patch_grid(slide, tissue, annotation, tumour_threshold=0.2, tissue_threshold=0.2)
    assert grid.coords.tolist() == [[0, 0], [1024, 0], [2048, 0], [0, 1024], [1024, 1024]]
    assert grid.labels.tolist() == [1, 1, 0, 1, 1]
    assert grid.counts == {"tumour": 4, "non_tumour": 1, "discarded": 1, "background": 10}


def test_without_annotation_labels_are_unknown(slide):
    tissue, _ = hand_masks()
    grid = build_patch_grid(slide, tissue)
    assert grid.coords.tolist() == [[0, 0], [1024, 0], [2048, 0], [3072, 0], [1024, 1024]]
    assert grid.labels.tolist() == [-1] * 5
    assert grid.counts == {"tumour": 0, "non_tumour": 0, "discarded": 0, "background": 11}


def test_other_magnifications_and_sizes(slide):
    tissue, _ = hand_masks()
    grid = build_patch_grid(slide, tissue, magnification=5, patch_size=128)  # 1024 px again
    assert grid.step == 1024 and len(grid.coords) == 5
    grid = build_patch_grid(slide, tissue, magnification=10, patch_size=512)
    assert grid.step == 2048 and grid.grid_shape == (2, 2)
    assert grid.coords.tolist() == [[0, 0], [2048, 0]]  # about 56 % and 50 % tissue; the lower row has none


def test_area_fractions_against_upsampling():
    """Non-integer cells (10 level-0 px over mask pixels of 3) against the brute force:
    blow the mask up to level 0 and average each cell, counting the outside as 0."""
    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) > 0.6
    fractions = area_fractions(mask, downsample=3, step=10, grid_shape=(16, 22))
    level0 = np.zeros((160, 220))
    level0[:150, :210] = np.repeat(np.repeat(mask, 3, axis=0), 3, axis=1)
    expected = level0.reshape(16, 10, 22, 10).mean(axis=(1, 3))
    np.testing.assert_allclose(fractions, expected, atol=1e-12)


def test_class_area_fractions_against_upsampling():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(50, 70))
    fractions = class_area_fractions(labels, 3, downsample=3, step=10, grid_shape=(16, 22))
    assert fractions.shape == (3, 16, 22)
    for c in range(3):
        level0 = np.zeros((160, 220))
        level0[:150, :210] = np.repeat(np.repeat(labels == c, 3, axis=0), 3, axis=1)
        np.testing.assert_allclose(fractions[c], level0.reshape(16, 10, 22, 10).mean(axis=(1, 3)), atol=1e-12)


def test_multi_class_majority_rule(slide):
    """Label map at downsample 4 (256 x 256 px per patch), tissue everywhere on row 0:
    (0,0) 40 % class 2 over 30 % class 0 (rest ignored) -> 2; (0,1) 0.5 % labelled ->
    discarded at min_labelled 0.01, class 1 at 0.001; (0,2) all ignored -> discarded;
    (0,3) all class 0."""
    from h2g.io.classes import IGNORE, ClassTable

    table = ClassTable.of([("a", 0), ("b", 1), ("c", 2)], ignore=[99])
    labels = np.full((1024, 1024), IGNORE, np.uint8)
    labels[0:77, 0:256] = 0
    labels[77:180, 0:256] = 2
    labels[0:1, 256:384] = 1           # 128 px of 65536 = 0.2 %
    labels[1:2, 256:456] = 1           # + 200 px: 0.5 %
    labels[0:256, 768:1024] = 0
    tissue = np.zeros((128, 128), bool)
    tissue[0:32] = True
    annotation = Annotation.from_labels(labels, 4.0, None, table)
    grid = build_patch_grid(slide, TissueMask(tissue, 32.0), annotation)
    assert grid.coords.tolist() == [[0, 0], [3072, 0]] and grid.labels.tolist() == [2, 0]
    assert grid.counts == {"a": 1, "b": 0, "c": 1, "discarded": 2, "background": 12}
    assert grid.classes == table
    loose = build_patch_grid(slide, TissueMask(tissue, 32.0), annotation, min_labelled=0.001)
    assert loose.labels.tolist() == [2, 1, 0] and loose.counts["discarded"] == 1


def test_partial_edge_patches(tmp_path):
    path = make_slide(tmp_path / "edge.tiff", (3000, 2100), pattern="tissue", tissue=(0, 0, 3000, 2100),
                      downsamples=(1, 4))
    with Slide(path) as opened:
        grid = build_patch_grid(opened)
    # columns cover 1024, 1024, 952 px; rows 1024, 1024, 52 px (5 % < 25 %: background)
    assert grid.grid_shape == (3, 3)
    assert grid.coords.tolist() == [[x, y] for y in (0, 1024) for x in (0, 1024, 2048)]
    assert grid.counts["background"] == 3


def test_twenty_x_slide_steps_512(tmp_path):
    path = make_slide(tmp_path / "20x.tiff", (2048, 1024), mpp=0.5, pattern="tissue",
                      tissue=(0, 0, 512, 512), downsamples=(1, 4))
    with Slide(path) as opened:
        grid = build_patch_grid(opened)
    assert grid.step == 512 and grid.grid_shape == (2, 4) and grid.coords.tolist() == [[0, 0]]


def test_end_to_end_on_a_synthetic_slide(tmp_path):
    """Detected tissue (JPEG slide) plus a TIFF mask: tumour in two patches, 10 % in one."""
    size = (4096, 3072)
    path = make_slide(tmp_path / "s.tiff", size, pattern="tissue", tissue=(1024, 1024, 3072, 1024))
    mask = make_mask(tmp_path / "m.tiff", size, [(1024, 1024, 2048, 1024), (3072, 1024, 1024, 100)])
    with Slide(path) as opened:
        grid = build_patch_grid(opened, detect_tissue(opened), load_annotation(mask, opened))
    assert grid.coords.tolist() == [[1024, 1024], [2048, 1024]]
    assert grid.labels.tolist() == [1, 1]
    assert grid.counts == {"tumour": 2, "non_tumour": 0, "discarded": 1, "background": 9}


# -- annotations ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path = make_slide(tmp_path_factory.mktemp("ann") / "small.tiff", (1026, 770), downsamples=(1,))
    with Slide(path) as opened:
        yield opened


RECTS = [(0, 0, 256, 128), (512, 400, 100, 300)]


@pytest.mark.parametrize("name", ["m.png", "m.tiff"])
def test_png_and_tiff_masks(small_slide, tmp_path, name):
    path = make_mask(tmp_path / name, (1026, 770), RECTS)
    annotation = load_annotation(path, small_slide)
    assert annotation.downsample == 4.0 and annotation.path == path
    assert annotation.mask.dtype == bool and annotation.mask.shape == (193, 257)
    np.testing.assert_array_equal(annotation.mask, mask_image((1026, 770), RECTS))
    assert annotation.mask[:32, :64].all() and annotation.mask.sum() == 32 * 64 + 75 * 25


def test_mask_value_conventions(small_slide, tmp_path):
    expected = mask_image((1026, 770), RECTS)
    rgba = np.zeros(expected.shape + (4,), np.uint8)
    rgba[..., 0] = np.where(expected, 200, 0)     # channel 0 > 127 is tumour
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_annotation(tmp_path / "rgba.png", small_slide).mask, expected)
    Image.fromarray(expected.astype(np.uint8)).save(tmp_path / "labels.png")  # 0/1 label map
    np.testing.assert_array_equal(load_annotation(tmp_path / "labels.png", small_slide).mask, expected)
    tifffile.imwrite(tmp_path / "plain.tif", expected.astype(np.uint8) * 255)
    np.testing.assert_array_equal(load_annotation(tmp_path / "plain.tif", small_slide).mask, expected)


def test_mask_sizes(small_slide, tmp_path):
    """1026 x 770 at downsample 4 is 256.5 x 192.5: 256 or 257 by 192 or 193 are fine."""
    for w, h in [(256, 192), (257, 193), (256, 193)]:
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / f"{w}.png")
        assert load_annotation(tmp_path / f"{w}.png", small_slide).mask.shape == (h, w)
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(AnnotationError) as err:
        load_annotation(tmp_path / "bad.png", small_slide)
    message = str(err.value)
    assert "bad.png" in message and "120x100" in message and "1026x770" in message
    assert "256x192" in message or "257x193" in message
    # any downsample: the mask's own (4 here) is found from its size; labels come at the grid asked for
    values = np.zeros((192, 256), np.uint8)
    values[10:20, 30:40] = 1
    Image.fromarray(values).save(tmp_path / "ds4.png")
    at2 = load_annotation(tmp_path / "ds4.png", small_slide, downsample=2)
    assert at2.downsample == 2 and at2.shape == (385, 513) and at2.labels.shape == (385, 513)
    np.testing.assert_array_equal(at2.mask[:384, :512], np.repeat(np.repeat(values, 2, 0), 2, 1).astype(bool))


def test_bad_annotation_files(small_slide, tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        load_annotation(tmp_path / "missing.png", small_slide)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(AnnotationError, match="cannot read") as err:
        load_annotation(tmp_path / "junk.png", small_slide)
    assert "junk.png" in str(err.value)
    (tmp_path / "junk.tiff").write_bytes(b"II*\x00garbage")
    with pytest.raises(AnnotationError, match="cannot read"):
        load_annotation(tmp_path / "junk.tiff", small_slide)


@pytest.mark.realdata
def test_real_slide_grid(real_data):
    """CMU-1-Small-Region (20x): 512 px steps, every kept patch over detected tissue."""
    with Slide(real_data / "slides" / "cmu_small_region.svs") as opened:
        tissue = detect_tissue(opened)
        grid = build_patch_grid(opened, tissue)
    assert grid.step == 512 and grid.grid_shape == (6, 5)
    assert len(grid.coords) + grid.counts["background"] == 30
    assert 5 <= len(grid.coords) <= 25
    for x, y in grid.coords:
        assert tissue.mask[y // 16:(y + 512) // 16, x // 16:(x + 512) // 16].mean() > 0.25
