"""h2g.io.slide: scale maths, reading at a magnification, errors, the handle cache."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from synthetic import cell_colour, decode_cell, make_slide, slide_image

from h2g.core.errors import SlideError
from h2g.io.pyramid import write_pyramid
from h2g.io.slide import Slide, open_slide, power_from_mpp

SIZE = (4096, 3072)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("wsi")


@pytest.fixture(scope="module")
def noise(folder):
    """Lossless 40x noise slide with levels 1, 4, 16 (level 1 is 10x exactly)."""
    return make_slide(folder / "noise.tiff", SIZE, mpp=0.25, pattern="noise", compression="zlib")


def block_mean(image, factor):
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image[:h * factor, :w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))


def test_scale_maths(noise):
    with Slide(noise) as slide:
        assert slide.format == "generic-tiff"
        assert slide.dimensions == SIZE and slide.level_count == 3
        assert slide.level_downsamples == (1.0, 4.0, 16.0)
        assert slide.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
        assert slide.mpp == pytest.approx(0.25) and slide.objective_power == 40
        assert [slide.downsample_for(m) for m in (40, 20, 10, 5, 1.25)] == [1, 2, 4, 8, 32]
        assert [slide.best_level_for(d) for d in (1, 2, 4, 3.9999999, 8, 16, 32)] == [0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("mpp, power", [(0.25, 40), (0.2467, 40), (0.2428, 40), (0.499, 20),
                                        (0.5, 20), (1.0, 10), (0.3, 33.33)])
def test_power_from_mpp(mpp, power):
    assert power_from_mpp(mpp) == power


def test_read_region_at_10x_is_level_1(noise):
    with Slide(noise) as slide, openslide.OpenSlide(str(noise)) as osr:
        for x, y in [(0, 0), (1000, 2000), (3000, 17)]:
            expected = np.asarray(osr.read_region((x, y), 1, (256, 256)))[..., :3]
            np.testing.assert_array_equal(slide.read_region((x, y), (256, 256), 10), expected)


def test_read_region_resizes_the_finer_level(noise):
    """5x comes from level 1 (10x) halved with an area filter: within 1 of the 2x2 means."""
    with Slide(noise) as slide, openslide.OpenSlide(str(noise)) as osr:
        got = slide.read_region((512, 256), (200, 100), 5)
        level1 = np.asarray(osr.read_region((512, 256), 1, (400, 200)))[..., :3].astype(float)
    assert got.shape == (100, 200, 3) and got.dtype == np.uint8
    assert np.abs(got - block_mean(level1, 2)).max() <= 1.0  # PIL box filter: fixed-point rounding


def test_pyramid_without_a_10x_level(folder):
    """Levels 1, 2, 8: 10x is level 1 halved, and matches 4x4 means of the level-0 image."""
    path = make_slide(folder / "no10x.tiff", SIZE, pattern="noise", downsamples=(1, 2, 8),
                      compression="zlib", seed=3)
    image = slide_image(SIZE, "noise", seed=3).astype(float)
    with Slide(path) as slide:
        assert slide.best_level_for(slide.downsample_for(10)) == 1
        got = slide.read_region((1024, 2048), (256, 256), 10)
    expected = block_mean(image[2048:3072, 1024:2048], 4)
    assert np.abs(got - expected).max() <= 1.0


def test_checker_cells_land_where_they_should(folder):
    """Each 256 px patch at 10x of a JPEG checker slide is the cell at its grid position."""
    path = make_slide(folder / "checker.tiff", SIZE, pattern="checker")
    slide = open_slide(path)
    for row in range(3):
        for col in range(4):
            patch = slide.read_region((col * 1024, row * 1024), (256, 256), 10)
            assert decode_cell(patch) == (row, col)
            assert np.abs(patch[8:-8, 8:-8].astype(int) - cell_colour(row, col)).max() <= 3


def test_regions_partly_outside_are_white(noise):
    with Slide(noise) as slide, openslide.OpenSlide(str(noise)) as osr:
        corner = slide.read_region((3840, 2816), (256, 256), 10)
        inside = np.asarray(osr.read_region((3840, 2816), 1, (64, 64)))[..., :3]
        np.testing.assert_array_equal(corner[:64, :64], inside)
        assert (corner[64:] == 255).all() and (corner[:, 64:] == 255).all()
        before = slide.read_region((-512, -512), (256, 256), 10)
        assert (before[:128] == 255).all() and (before[:, :128] == 255).all()
        np.testing.assert_array_equal(before[128:, 128:],
                                      np.asarray(osr.read_region((0, 0), 1, (128, 128)))[..., :3])


def test_transparent_pixels_become_white(folder):
    """Straight alpha is composited over white: alpha 0 -> white, 128 -> halfway."""
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., :3] = (100, 50, 0)
    rgba[:, :256, 3] = 255
    rgba[:, 256:384, 3] = 0
    rgba[:, 384:, 3] = 128
    path = folder / "alpha.tiff"
    tifffile.imwrite(path, rgba, tile=(256, 256), photometric="rgb", extrasamples=["unassalpha"],
                     resolution=(40000.0, 40000.0), resolutionunit="CENTIMETER", metadata=None)
    with Slide(path) as slide:
        image = slide.read_level(0)
    assert (image[:, :256] == (100, 50, 0)).all()
    assert (image[:, 256:384] == 255).all()
    expected = np.rint(np.array([100, 50, 0]) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(image[:, 384:].astype(int) - expected).max() <= 1


def test_whole_slide_reads(noise):
    with Slide(noise) as slide:
        assert slide.read_level(2).shape == (192, 256, 3)
        low = slide.read_magnification(1.25)
        assert low.shape == (96, 128, 3)
        assert np.abs(low - block_mean(slide.read_level(2).astype(float), 2)).max() <= 1.0  # PIL box filter: fixed-point rounding
        with pytest.raises(SlideError, match="level 5 does not exist"):
            slide.read_level(5)


@pytest.mark.slow
def test_large_levels_are_read_in_bands_with_the_same_pixels(noise, monkeypatch):
    """Bands (here 7 rows, not a tile multiple) give exactly the one-call read, on level 0
    and on a reduced level (band tops in level-0 pixels = rows x downsample)."""
    import openslide

    from h2g.io import slide as wsi

    osr = openslide.OpenSlide(str(noise))
    with Slide(noise) as slide:
        one_call = slide.read_magnification(1.25)  # level 2 (192 rows) shrunk by 2, in one read
        monkeypatch.setattr(wsi, "BAND_ROWS", 7)  # 6-row bands when shrinking by 2
        monkeypatch.setattr(wsi, "BLOCK_COLS", 100)  # and 100-column blocks
        for level in (0, 1):
            whole = np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]))[..., :3]
            np.testing.assert_array_equal(slide.read_level(level), whole)
        np.testing.assert_array_equal(slide.read_magnification(1.25), one_call)
        np.testing.assert_array_equal(slide.read_magnification(2.5), slide.read_level(2))  # exact level
    osr.close()


def test_region_errors(noise):
    with Slide(noise) as slide:
        with pytest.raises(SlideError, match="outside the slide") as err:
            slide.read_region((4096, 0), (256, 256), 10)
        assert str(noise) in str(err.value)
        with pytest.raises(SlideError, match="outside the slide"):
            slide.read_region((-1024, 100), (256, 256), 10)
        with pytest.raises(SlideError, match="80x is above the scan's 40x"):
            slide.read_region((0, 0), (256, 256), 80)
        with pytest.raises(SlideError, match="above the scan"):
            slide.read_magnification(41)


def test_mpp_override_wins(noise):
    with Slide(noise, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.objective_power == 20 and slide.downsample_for(10) == 2
    with pytest.raises(SlideError, match="positive number"):
        Slide(noise, mpp=-1)


def test_slide_without_scale_needs_an_override(folder):
    path = make_slide(folder / "noscale.tiff", (1024, 1024), mpp=None, downsamples=(1, 4))
    with Slide(path) as slide:
        assert slide.dimensions == (1024, 1024) and not slide.has_scale
        assert slide.read_level(1).shape == (256, 256, 3)
        for need in (lambda: slide.mpp, lambda: slide.objective_power,
                     lambda: slide.read_region((0, 0), (64, 64), 10)):
            with pytest.raises(SlideError, match="`mpp` column or the `--mpp` argument") as err:
                need()
            assert str(path) in str(err.value)
    with Slide(path, mpp=1.0) as slide:
        assert slide.objective_power == 10 and slide.read_region((0, 0), (64, 64), 10).shape == (64, 64, 3)


def test_bad_files(folder):
    text = folder / "notes.txt"
    text.write_text("not a slide")
    png = folder / "picture.png"
    Image.new("RGB", (64, 64), "red").save(png)
    stripped = folder / "stripped.tif"
    Image.new("RGB", (64, 64), "red").save(stripped)
    fake_svs = folder / "fake.svs"
    fake_svs.write_bytes(b"garbage" * 100)
    empty = folder / "empty.svs"
    empty.write_bytes(b"")
    cases = [
        (folder / "missing.svs", "file not found"),
        (folder, "is a directory"),
        (text, "not a slide"),
        (png, "not a slide: a plain PNG image"),
        (stripped, "not tiled"),
        (fake_svs, "corrupt slide"),
        (empty, "empty"),
    ]
    for path, problem in cases:
        with pytest.raises(SlideError, match=problem) as err:
            Slide(path)
        assert err.value.path == str(path)


def test_unsupported_compression(folder):
    path = write_pyramid(folder / "lzma.tiff", np.zeros((512, 512, 3), np.uint8),
                         compression="lzma", downsamples=[1])
    with pytest.raises(SlideError, match="compression") as err:
        Slide(path)
    assert str(path) in str(err.value)


def test_undecodable_tiles_fail_and_leave_the_cache(folder):
    path = make_slide(folder / "badtile.tiff", (1024, 1024), downsamples=(1, 4))
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    with pytest.raises(SlideError, match="cannot decode image data") as err:
        slide.read_region((0, 0), (64, 64), 40)
    assert str(path) in str(err.value)
    assert open_slide(path) is not slide


def test_open_slide_cache(folder, noise, monkeypatch):
    monkeypatch.chdir(folder)
    shared = open_slide(noise)
    assert open_slide("noise.tiff") is shared
    assert open_slide(noise, mpp=0.5) is not shared
    assert open_slide(noise, mpp=0.5).objective_power == 20
    path = make_slide(folder / "rewritten.tiff", (1024, 1024), downsamples=(1,))
    first = open_slide(path)
    make_slide(path, (2048, 1024), downsamples=(1,))
    assert open_slide(path) is not first and open_slide(path).dimensions == (2048, 1024)
    with open_slide(path) as closing:
        pass
    assert open_slide(path) is not closing
    closing.close()  # closing twice is harmless; reading a closed slide is an error
    with pytest.raises(SlideError, match="closed"):
        closing.read_level(0)


def test_threads_share_a_handle(noise):
    slide = open_slide(noise)
    spots = [((x * 97) % 3800, (x * 61) % 2800) for x in range(24)]
    expected = [slide.read_region(s, (128, 128), 10) for s in spots]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: open_slide(noise).read_region(s, (128, 128), 10), spots))
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


# -- real slides ------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_aperio_jpeg(real_data):
    path = real_data / "slides" / "cmu_small_region.svs"
    with Slide(path) as slide, openslide.OpenSlide(str(path)) as osr:
        assert slide.format == "aperio" and slide.dimensions == (2220, 2967)
        assert slide.objective_power == 20 and slide.mpp == pytest.approx(0.499)
        assert slide.level_count == 1 and slide.downsample_for(10) == 2
        got = slide.read_region((600, 800), (256, 256), 10)
        full = np.asarray(osr.read_region((600, 800), 0, (512, 512)))[..., :3]
    expected = np.asarray(Image.fromarray(full).resize((256, 256), Image.BOX))
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - block_mean(full.astype(float), 2)).max() <= 1.0  # PIL box filter: fixed-point rounding


@pytest.mark.realdata
def test_real_aperio_jpeg2000_without_scale(real_data):
    path = real_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    with Slide(path) as slide:
        assert slide.format == "aperio" and slide.dimensions == (4443, 3567)
        assert slide.level_count == 2 and slide.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)
        assert slide.read_level(1).shape == (1783, 2221, 3)
        with pytest.raises(SlideError, match="--mpp"):
            slide.downsample_for(10)
    with Slide(path, mpp=0.25) as slide:
        assert slide.objective_power == 40 and slide.best_level_for(4) == 1
        patch = slide.read_region((2000, 1500), (256, 256), 10)
        assert patch.shape == (256, 256, 3) and patch.std() > 5  # real tissue, not blank


@pytest.mark.realdata
def test_real_corrupt_file(real_data):
    path = real_data / "slides" / "broken.svs"
    with pytest.raises(SlideError, match="corrupt") as err:
        Slide(path)
    assert str(path) in str(err.value)


def test_mpp_override_also_sets_the_objective_power(folder):
    """A file with both an objective power and an mpp: the override decides both (the
    file's power must not win), and without an override the file's power is kept."""
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    path = folder / "aperio.svs"
    header = "Aperio Image Library v10.0.0\n1024x1024 [0,0 1024x1024] (256x256)"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None,
                  description=f"{header}|AppMag = 20|MPP = 0.25")
        tif.write(np.ascontiguousarray(image[::4, ::4]), tile=(256, 256), compression="zlib",
                  photometric="rgb", metadata=None, subfiletype=1, description=header)
    with Slide(path) as slide:
        assert slide.format == "aperio"
        assert slide.mpp == 0.25 and slide.objective_power == 20 and slide.downsample_for(10) == 2
    for mpp, power in ((1.0, 10), (0.5, 20), (0.25, 40), (0.3, 33.33)):
        with Slide(path, mpp=mpp) as slide:
            assert slide.mpp == mpp and slide.objective_power == power
            assert slide.downsample_for(5) == pytest.approx(power / 5)
    with Slide(path, mpp=1.0) as slide:  # 10x = level 0: no resizing
        np.testing.assert_array_equal(slide.read_region((100, 200), (64, 64), 10), image[200:264, 100:164])


def test_a_level_too_large_to_hold_is_read_region_by_region_into_an_overview(folder, monkeypatch, capsys):
    """A single-level slide's coarse views come from an overview built block by block (a
    progress bar on the way): the same block means as the whole level read at once and
    box-shrunk (cv2's area filter: within 1 grey level), and the level is never read
    whole."""
    from h2g.io import slide as wsi

    path = make_slide(folder / "flat.tiff", (1200, 900), pattern="noise", downsamples=(1,))
    with Slide(path) as slide:
        whole = slide.read_level(0)
    monkeypatch.setattr(wsi, "LARGE_LEVEL_PIXELS", 1000)  # this level counts as too large to hold
    monkeypatch.setattr(wsi, "OVERVIEW_SIDE", 300)  # overview shrunk by 4: 300 x 225
    monkeypatch.setattr(wsi, "BAND_ROWS", 100)
    monkeypatch.setattr(wsi, "BLOCK_COLS", 256)
    monkeypatch.setattr(wsi, "PROGRESS_BLOCKS", 4)
    monkeypatch.setattr(wsi, "SHOW_PROGRESS", True)
    largest = []
    read = Slide._level_region

    def spy(self, level, left, top, cols, rows):
        largest.append(cols * rows)
        return read(self, level, left, top, cols, rows)

    monkeypatch.setattr(Slide, "_level_region", spy)
    with Slide(path) as slide:
        by8 = slide.read_level_shrunk(0, 8)  # from the overview: 4 x 2
        lowres = slide.read_magnification(2.5)  # 40x / 16 = 75 x 56.25 -> 75 x 56
    assert max(largest) <= 100 * 256
    assert by8.shape == (113, 150, 3)
    assert np.abs(by8[:112].astype(int) - block_mean(whole[:896].astype(float), 8)).max() <= 1.5
    real = whole[896:900].astype(float).reshape(4, 150, 8, 3).sum(axis=(0, 2))  # the last row: 4 slide rows ...
    assert np.abs(by8[112] - (real + 32 * 255.0) / 64).max() <= 1.5  # ... and 4 rows of white glass padding
    assert lowres.shape == (56, 75, 3)
    assert "reading flat.tiff level 0" in capsys.readouterr().err
