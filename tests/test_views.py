"""h2g.data.views and the sample readers of h2g.data.readers: co-centred views at several
magnifications, padding beyond the slide, H2G-Net's patch view, pixel targets."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import openslide
import pytest
from synthetic import make_slide

from h2g.core.errors import ConfigError, SlideError
from h2g.data.readers import IGNORE, read_label_view, read_patch, read_sample
from h2g.data.views import View, check_views, read_view, read_views
from h2g.io.pyramid import write_pyramid
from h2g.io.slide import Slide

SIZE = (4096, 3072)  # 40x (mpp 0.25), levels 1, 4, 16
GREY, MARK = (200, 190, 180), (10, 20, 30)
CX, CY = 2048, 1536  # marker centre: multiples of 16, so every level's pixels align


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("views")


@pytest.fixture(scope="module")
def marker(folder):
    """A grey 40x slide with a 16 x 16 level-0 px marker centred on (CX, CY)."""
    image = np.empty((SIZE[1], SIZE[0], 3), np.uint8)
    image[:] = GREY
    image[CY - 8:CY + 8, CX - 8:CX + 8] = MARK
    path = write_pyramid(folder / "marker.tiff", image, mpp=0.25, downsamples=[1, 4, 16], compression="zlib")
    with Slide(path) as slide:
        yield slide


@pytest.fixture(scope="module")
def noise(folder):
    path = make_slide(folder / "noise.tiff", SIZE, mpp=0.25, pattern="noise", compression="zlib",
                      downsamples=(1, 4, 16))
    with Slide(path) as slide:
        yield slide


def level1(slide, x, y, w, h):
    """OpenSlide's level 1 (10x exactly on these slides) at level-0 (x, y), glass where transparent."""
    with openslide.OpenSlide(str(slide.path)) as osr:
        rgba = np.asarray(osr.read_region((x, y), 1, (w, h)))
    return np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)


# ---------------------------------------------------------------------------- centres
@pytest.mark.parametrize("padding", ["reflect", "white"])
def test_views_at_different_magnifications_share_their_centre(marker, padding):
    views = [View("x20", 20, 256, padding), View("x10", 10, 256, padding), View("x5", 5, 256, padding)]
    out = read_views(marker, (CX, CY), views)
    assert list(out) == ["x20", "x10", "x5"]
    # the marker's 16 level-0 px are 8, 4 and 2 output px at 20x, 10x, 5x, around pixel 128
    for name, half in (("x20", 4), ("x10", 2), ("x5", 1)):
        expected = np.empty((256, 256, 3), np.uint8)
        expected[:] = GREY
        expected[128 - half:128 + half, 128 - half:128 + half] = MARK
        assert out[name].dtype == np.uint8
        np.testing.assert_array_equal(out[name], expected, err_msg=name)


def test_odd_sizes_and_fractional_centres_stay_centred(marker):
    # a 3 px view at 10x around the marker centre: level-0 [CX - 6, CX + 6); marker covers
    # [CX - 8, CX + 8), so every pixel is marker
    np.testing.assert_array_equal(read_view(marker, (CX, CY), View("v", 10, 3)),
                                  np.broadcast_to(np.array(MARK, np.uint8), (3, 3, 3)))
    # shifting the centre by 16 level-0 px moves the marker 4 px at 10x
    view = read_view(marker, (CX + 16, CY), View("v", 10, 16))
    expected = np.empty((16, 16, 3), np.uint8)
    expected[:] = GREY
    expected[6:10, 2:6] = MARK
    np.testing.assert_array_equal(view, expected)


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("centre, inner, pad", [
    # top-left: the 10x view spans level-0 [-256, 768) x [-312, 712): 64 columns and 78
    # rows lie before the slide
    ((256, 200), (0, 0, 192, 178), ((78, 0), (64, 0))),
    # bottom-right: [3488, 4512) x [2600, 3624): 152 columns and 118 rows inside
    ((4000, 3112), (3488, 2600, 152, 118), ((0, 138), (0, 104))),
])
def test_reflect_padding_mirrors_the_inside_part(noise, centre, inner, pad):
    out = read_view(noise, centre, View("ctx", 10, 256, "reflect"))
    expected = np.pad(level1(noise, *inner), pad + ((0, 0),), mode="reflect")
    assert out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out, expected)


def test_white_padding_is_what_openslide_gives_outside(noise):
    for centre in ((256, 200), (4000, 3112)):
        out = read_view(noise, centre, View("patch", 10, 256, "white"))
        expected = level1(noise, centre[0] - 512, centre[1] - 512, 256, 256)
        np.testing.assert_array_equal(out, expected)
        assert (out == 255).all(axis=-1).any()  # some glass beyond the edge


@pytest.mark.parametrize("padding", ["reflect", "white"])
def test_a_view_entirely_outside_the_slide_is_an_error_naming_the_file(noise, padding):
    for centre in ((-5000, 100), (100, 3072 + 600), (4096 + 513, 1000)):
        with pytest.raises(SlideError, match="outside the slide") as err:
            read_view(noise, centre, View("v", 10, 256, padding))
        assert str(noise.path) in str(err.value)


# ---------------------------------------------------------------------------- H2G-Net's patch view
@pytest.mark.parametrize("mpp, magnification", [(0.25, 10), (0.5, 10), (0.25, 15), (0.25, 5)])
def test_h2g_patch_view_reads_exactly_todays_patch(folder, mpp, magnification):
    """10x, 256 px, white padding, centred on the patch centre == read_region at the top-left
    (the patch read before views existed), also where the downsample is fractional."""
    path = make_slide(folder / f"patch_{mpp}.tiff", (3000, 2200), mpp=mpp, pattern="noise",
                      compression="zlib", downsamples=(1, 4), seed=3)
    view = View("image", magnification, 256, "white")
    with Slide(path) as slide:
        d = slide.objective_power / magnification
        for x, y in [(0, 0), (1000, 700), (2900, 2100), (2999, 5), (-100, -50), (1233, 1777)]:
            today = slide.read_region((x, y), (256, 256), magnification)
            centre = (x + 256 * d / 2, y + 256 * d / 2)
            np.testing.assert_array_equal(read_view(slide, centre, view), today)
            np.testing.assert_array_equal(read_patch(slide, x, y, magnification=magnification), today)
        source = SimpleNamespace(slide_path=path, mpp=None)
        np.testing.assert_array_equal(read_patch(source, 1000, 700, magnification=magnification),
                                      slide.read_region((1000, 700), (256, 256), magnification))


def test_read_sample_from_a_slide_or_a_source(marker):
    views = [View("a", 10, 32), View("b", 5, 16, "white")]
    from_slide = read_sample(marker, (CX, CY), views)
    from_source = read_sample(SimpleNamespace(slide_path=marker.path, mpp=None), (CX, CY), views)
    assert {k: v.shape for k, v in from_slide.items()} == {"a": (32, 32, 3), "b": (16, 16, 3)}
    for name in from_slide:
        np.testing.assert_array_equal(from_slide[name], from_source[name])


# ---------------------------------------------------------------------------- pixel targets
def label_image(size, downsample):
    """A label map at ``downsample`` with classes 0-2 in 64 px bands and an unlabelled corner."""
    w, h = -(-size[0] // downsample), -(-size[1] // downsample)
    rows, cols = np.mgrid[0:h, 0:w]
    labels = ((cols // 16 + rows // 16) % 3).astype(np.uint8)
    labels[:40, :40] = IGNORE
    return labels


@pytest.mark.parametrize("magnification, size, centre", [
    (20, 64, (CX, CY)), (10, 50, (1001, 707)), (5, 40, (300, 150)), (10, 64, (4050, 3050)),
])
def test_pixel_target_is_the_label_under_each_output_pixel(marker, magnification, size, centre):
    labels = label_image(SIZE, 4)
    annotation = SimpleNamespace(labels=labels, mask=labels == 1, downsample=4.0)
    d = 40 / magnification
    level0 = np.repeat(np.repeat(labels, 4, axis=0), 4, axis=1)[:SIZE[1], :SIZE[0]]  # label per level-0 px
    # output pixel (i, j) has its centre at level-0 top-left + (j + 0.5) * d
    x = np.floor(centre[0] - size * d / 2 + (np.arange(size) + 0.5) * d).astype(int)
    y = np.floor(centre[1] - size * d / 2 + (np.arange(size) + 0.5) * d).astype(int)
    expected = np.full((size, size), IGNORE, np.uint8)
    xi, yi = (x >= 0) & (x < SIZE[0]), (y >= 0) & (y < SIZE[1])
    expected[np.ix_(yi, xi)] = level0[np.ix_(y[yi], x[xi])]
    out = read_label_view(annotation, marker, centre, View("t", magnification, size))
    assert out.dtype == np.uint8 and out.shape == (size, size)
    np.testing.assert_array_equal(out, expected)


def test_pixel_target_of_a_binary_mask_and_beyond_the_map(marker):
    mask = np.zeros((768, 1024), bool)
    mask[384:, :] = True  # tumour below level-0 row 1536
    annotation = SimpleNamespace(mask=mask, downsample=4.0)
    out = read_label_view(annotation, marker, (CX, CY), View("t", 10, 8))  # rows 1520..1552
    np.testing.assert_array_equal(out, np.repeat([[0]] * 4 + [[1]] * 4, 8, axis=1).astype(np.uint8))
    # a map smaller than the slide (one row short): the missing row is unlabelled
    short = SimpleNamespace(mask=np.ones((767, 1024), bool), downsample=4.0)
    bottom = read_label_view(short, marker, (CX, 3072 - 8), View("t", 40, 16))  # level-0 rows 3056..3071
    assert (bottom[:12] == 1).all() and (bottom[12:] == IGNORE).all()


# ---------------------------------------------------------------------------- view specs
def test_view_specs_are_checked():
    with pytest.raises(ConfigError, match="padding"):
        View("v", 10, 256, "zero")
    with pytest.raises(ConfigError, match="positive"):
        View("v", 10, 0)
    with pytest.raises(ConfigError, match="positive"):
        View("v", -5, 256)
    with pytest.raises(ConfigError, match="name"):
        View("", 10, 256)
    with pytest.raises(ConfigError, match="unique"):
        check_views([View("a", 10, 8), View("a", 5, 8)])
    with pytest.raises(ConfigError, match="at least one"):
        check_views([])
    view = View("ctx", 5, 512, "white")
    assert View.from_dict(view.to_dict()) == view
    assert View.from_dict({"name": "x", "magnification": 20, "size": 256}).padding == "reflect"


def test_magnification_above_the_scan_is_an_error(marker):
    with pytest.raises(SlideError, match="above the scan"):
        read_view(marker, (CX, CY), View("v", 80, 16))
