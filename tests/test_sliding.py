"""Sliding-window segmentation: window grids over tissue, multi-view feeds, blending, and
the Raster they are stitched into.

The block slide is a 40x (0.25 um/px) slide of 128 x 128 level-0 blocks, each pure red,
green or blue (a seeded random choice), with a band of glass on the right: its class map
at any magnification is known from the block choices alone, independently of the code.
"""
from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_slide
from helpers import COLOURS, CONTEXT_VIEWS, Recorder, SIZE, WINDOW, colour_segmenter, context_segmenter, expected_labels, make_block_slide, softmax

from h2g.core.errors import ConfigError, ExportError
from h2g.data.views import View
from h2g.inference.backends import _BackendBase
from h2g.inference.raster import Raster, raster_shape
from h2g.inference.sliding import Stitcher, blend_weights, sliding_segmentation
from h2g.io.pyramid import write_pyramid
from h2g.io.slide import Slide
from h2g.tiling.windows import window_grid

@pytest.fixture(scope="module")
def block_slide(tmp_path_factory):
    path = make_block_slide(tmp_path_factory.mktemp("blocks") / "blocks.tiff")
    with Slide(path) as slide:
        yield slide


# ---------------------------------------------------------------------------- geometry
def test_window_grid_over_tissue_of_a_non_square_slide(tmp_path):
    path = make_slide(tmp_path / "s.tiff", size=(2560, 1536), tissue=(512, 256, 1024, 512),
                      compression=None)
    with Slide(path) as slide:
        grid = window_grid(slide, magnification=10, size=64)
        assert grid.downsample == 4 and grid.grid_shape == (6, 10) and grid.extent == (2560, 1536)
        # the tissue block spans level-0 x 512..1536, y 256..768: cells cols 2..5, rows 1..2
        assert sorted(map(tuple, grid.cells)) == [(r, c) for r in (1, 2) for c in range(2, 6)]
        np.testing.assert_array_equal(grid.centres, grid.cells[:, ::-1] * 256 + 128)
        overlapping = window_grid(slide, magnification=10, size=64, stride=32)
        assert overlapping.grid_shape == (12, 20)
        np.testing.assert_array_equal(overlapping.top_left, overlapping.cells * 32 - 16)
        raster = sliding_segmentation(slide, Recorder(["image"], 64), [View("image", 10, 64)], progress=False)
    assert raster.shape == (384, 640) and raster.downsample == 4 and raster.extent == (2560, 1536)
    covered = np.zeros((384, 640), bool)
    covered[64:192, 128:384] = True  # the tissue cells, in raster px
    np.testing.assert_array_equal(raster.covered, covered)


def test_raster_helpers_keep_the_aspect_ratio():
    probs = np.zeros((3, 5, 2), np.float32)
    probs[..., 1] = np.arange(5) / 4.0  # class 1 wins where it is > 0.5
    probs[..., 0] = 1.0 - probs[..., 1]
    covered = np.ones((3, 5), bool)
    covered[0, 0] = False
    raster = Raster(probs, 8.0, (40, 20), covered)  # 20 / 8 -> 3 rows, 40 / 8 -> 5 cols
    labels = raster.label_map(fill=-1)
    np.testing.assert_array_equal(labels[1], [0, 0, 0, 1, 1])  # a tie (0.5, 0.5) -> class 0
    assert labels[0, 0] == -1
    half = raster.resized(4.0)
    assert half.shape == (5, 10) and half.downsample == 4.0 and half.extent == (40, 20)
    part = raster.crop(8, 8, 16, 8)
    assert part.shape == (1, 2) and part.extent == (16, 8)
    np.testing.assert_array_equal(part.probs, probs[1:2, 1:3])
    assert raster_shape((41, 20), 8.0) == (3, 6)
    with pytest.raises(ConfigError):
        Raster(np.zeros((3, 5)), 1.0, (5, 3))


# ---------------------------------------------------------------------------- blending
def test_blend_weights_and_stitching_by_hand():
    np.testing.assert_allclose(blend_weights(4, "tent")[1], 0.75 * np.array([0.25, 0.75, 0.75, 0.25]))
    np.testing.assert_array_equal(blend_weights(4, "centre", keep=2)[1], [0, 1, 1, 0])
    np.testing.assert_array_equal(blend_weights(4, "centre")[0], [1, 1, 1, 1])
    with pytest.raises(ConfigError):
        blend_weights(4, "median")
    ones, zeros = np.ones((4, 4, 1), np.float32), np.zeros((4, 4, 1), np.float32)

    tent = Stitcher((4, 6), 1, blend_weights(4, "tent"))
    tent.add((0, 0), ones)
    tent.add((0, 2), zeros)
    probs, covered = tent.result()
    # column 2: 1 with weight 0.75, 0 with weight 0.25 -> 0.75; column 3: 0.25
    np.testing.assert_allclose(probs[..., 0], np.tile([1, 1, 0.75, 0.25, 0, 0], (4, 1)), atol=1e-6)
    assert covered.all()

    centre = Stitcher((4, 6), 1, blend_weights(4, "centre", keep=2))
    centre.add((0, 0), ones)
    centre.add((0, 2), zeros)
    probs, covered = centre.result()
    np.testing.assert_array_equal(covered[1], [False, True, True, True, True, False])
    np.testing.assert_array_equal(probs[1, :, 0], [0, 1, 1, 0, 0, 0])
    corner = Stitcher((4, 6), 1, blend_weights(4, "centre", keep=2))
    corner.add((-1, 4), ones)  # kept rows -> raster 0..1, kept cols -> 5..6: only (0..1, 5) inside
    probs, covered = corner.result()
    assert covered.sum() == 2 and covered[0, 5] and covered[1, 5] and probs[0, 5, 0] == 1



def _masked_division(sums: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stitcher's former formula, as the reference: a boolean-mask gather, divide, scatter."""
    covered = weights > 0
    probs = np.zeros_like(sums)
    probs[covered] = sums[covered] / weights[covered][:, None]
    return probs, covered


@pytest.mark.parametrize("blend,keep,step", [("tent", None, 3), ("centre", 3, 2), ("centre", None, 8)])
def test_stitcher_result_equals_the_masked_division_to_the_bit(blend, keep, step, monkeypatch):
    """Random windows (overlapping, hanging over the edges, leaving gaps) blended by
    tent / centre weights, unit weights included (keep = size: the division is skipped):
    the result equals the masked division of the same sums to the bit, NaN where a
    window predicted NaN, 0 (+0.0) wherever nothing was covered; in bands of 5 rows."""
    from h2g.inference import sliding

    monkeypatch.setattr(sliding, "RESULT_ROWS", 5)
    rng = np.random.default_rng(7)
    stitcher = Stitcher((23, 31), 4, blend_weights(8, blend, keep))
    for r in range(-4, 23, step):
        for c in range(-4, 31, step + 1):
            if (r, c) == (-4 + 2 * step, step - 3):  # one window of NaN
                stitcher.add((r, c), np.full((8, 8, 4), np.nan, np.float32))
            elif rng.random() < 0.7 and not (r >= 10 and c >= 16):  # random gaps, an empty corner
                stitcher.add((r, c), rng.random((8, 8, 4), np.float32) * rng.choice([1, -1]))
    want, want_covered = _masked_division(stitcher.sum.copy(), stitcher.weight.copy())
    assert 0 < want_covered.mean() < 1 and np.isnan(want).any()
    assert (stitcher.weight[want_covered] == 1).all() == (step == 8)  # the unit-weight case is the last one
    probs, covered = stitcher.result()
    np.testing.assert_array_equal(covered, want_covered)
    np.testing.assert_array_equal(probs.view(np.uint32), want.view(np.uint32))  # NaN payloads and -0.0 too
    assert stitcher.result()[0] is probs  # a second call returns the same raster, not a second division
    with pytest.raises(RuntimeError):
        stitcher.add((0, 0), np.zeros((8, 8, 4), np.float32))


# ---------------------------------------------------------------------------- whole slides
def _segment_blocks(slide, *args, **kwargs):
    """:func:`sliding_segmentation` over the colour-block slide, whose green and blue blocks
    are classes here, not pen ink: tissue detected without dropping ink."""
    from h2g.tiling.tissue import detect_tissue

    return sliding_segmentation(slide, *args, tissue=detect_tissue(slide, drop_ink=False), **kwargs)


@pytest.mark.parametrize("blend,stride", [("centre", None), ("tent", 32)])
def test_a_colour_model_reproduces_the_known_class_map(block_slide, blend, stride):
    from h2g.inference.backends import KerasBackend

    timings: dict = {}
    raster = _segment_blocks(block_slide, KerasBackend(colour_segmenter()), [View("image", 10, WINDOW)],
                                  stride=stride, blend=blend, batch_size=8, progress=False, timings=timings)
    assert raster.shape == (384, 768) and raster.downsample == 4 and raster.extent == SIZE
    want = expected_labels(4)
    tissue = want >= 0
    assert raster.covered[tissue].all()
    if blend == "centre":  # each window over tissue covers its own cell only
        np.testing.assert_array_equal(raster.covered, tissue)
        assert timings["windows"] == 6 * 10
    else:
        assert timings["windows"] == 12 * 20
    np.testing.assert_array_equal(raster.label_map()[tissue], want[tissue])
    # a per-pixel model: any blend of its predictions is its prediction
    expected_probs = softmax(20.0 * COLOURS[want[tissue]] / 255.0)
    np.testing.assert_allclose(raster.probs[tissue], expected_probs, atol=1e-5)
    assert set(timings) >= {"tissue", "reading", "inference", "waiting", "window_pipeline", "stitching"}


def test_multi_view_feeds_are_co_centred(block_slide):
    from h2g.inference.backends import KerasBackend

    raster = _segment_blocks(block_slide, KerasBackend(context_segmenter()), CONTEXT_VIEWS,
                                  batch_size=4, progress=False)
    want = expected_labels(4)
    tissue = want >= 0
    np.testing.assert_array_equal(raster.label_map()[tissue], want[tissue])


def test_reflection_padded_window_at_the_slide_border(tmp_path):
    path = make_slide(tmp_path / "noise.tiff", size=(256, 192), pattern="noise", compression=None,
                      downsamples=(1,))
    from synthetic import slide_image

    image = slide_image((256, 192), "noise")
    recorder = Recorder(["image"], 32)
    with Slide(path) as slide:
        raster = sliding_segmentation(slide, recorder, [View("image", 40, 32)], stride=16, progress=False)
    assert raster.shape == (192, 256) and raster.downsample == 1
    first = recorder.feeds[1][0]  # feeds[0] is the shape probe; window of cell (0, 0)
    # the window spans level-0 -8..24: 8 px beyond the top and left edges, mirrored
    expected = np.pad(image[:24, :24], ((8, 0), (8, 0), (0, 0)), mode="reflect").astype(np.float32) / 255
    np.testing.assert_allclose(first, expected, atol=1e-6)


def test_views_must_match_the_model_inputs(block_slide):
    with pytest.raises(ExportError, match="are not the views"):
        _segment_blocks(block_slide, Recorder(["a", "b"], 64), CONTEXT_VIEWS, progress=False)
    with pytest.raises(ConfigError, match="whole number"):
        _segment_blocks(block_slide, Recorder(["image"], 32), [View("image", 10, 64)], stride=33,
                             progress=False)


def test_a_coarser_raster_is_the_block_mean_of_the_fine_one(block_slide):
    """raster_downsample 4: the raster is 4x coarser and, each fine pixel coming from one
    window with weight 1 (blend centre, no overlap), every raster pixel is the plain mean
    of the 4 x 4 fine pixels it covers (averaged here with numpy).  With unequal weights
    a raster pixel is the weighted mean (a hand-made case), and a window off the blocks
    is refused."""
    from h2g.inference.backends import KerasBackend
    from h2g.inference.sliding import Stitcher

    views, model = [View("image", 10.0, WINDOW)], KerasBackend(colour_segmenter())
    fine = sliding_segmentation(block_slide, model, views, progress=False)
    coarse = sliding_segmentation(block_slide, model, views, progress=False, raster_downsample=4)
    assert coarse.downsample == 4 * fine.downsample and coarse.shape == (-(-fine.shape[0] // 4),
                                                                         -(-fine.shape[1] // 4))
    rows, cols = fine.shape[0] // 4, fine.shape[1] // 4
    blocks = fine.probs[:rows * 4, :cols * 4].reshape(rows, 4, cols, 4, -1)
    covered = fine.covered[:rows * 4, :cols * 4].reshape(rows, 4, cols, 4).all(axis=(1, 3))
    np.testing.assert_allclose(coarse.probs[:rows, :cols][covered], blocks.mean(axis=(1, 3))[covered], atol=1e-6)
    np.testing.assert_array_equal(coarse.covered[:rows, :cols], fine.covered[:rows * 4, :cols * 4].reshape(
        rows, 4, cols, 4).any(axis=(1, 3)))

    weights = np.ones((4, 4), np.float32)
    weights[0, 0] = 3.0  # the top-left fine pixel counts three times
    s = Stitcher((2, 2), 1, weights, factor=2)
    s.add((0, 0), np.arange(16, dtype=np.float32).reshape(4, 4, 1))
    probs, hit = s.result()
    assert probs[0, 0, 0] == pytest.approx((3 * 0 + 1 + 4 + 5) / 6) and probs[1, 1, 0] == np.mean([10, 11, 14, 15])
    assert hit.all()
    with pytest.raises(ConfigError, match="not on the raster's 2 px blocks"):
        Stitcher((4, 4), 1, np.ones((8, 8), np.float32), factor=2).add((1, 0), np.zeros((8, 8, 1), np.float32))


def test_a_raster_too_large_for_memory_is_refused_with_the_factor_that_fits():
    from h2g.inference.sliding import raster_stitcher

    weights = np.ones((256, 256), np.float32)
    # a 100k x 100k slide at downsample 2 (20x of 40x), 6 classes: 50000^2 x 7 x 4 bytes = 65 GiB
    with pytest.raises(ConfigError, match=r"50000 x 50000 x 6 class raster .* needs 65\.2 GiB.*--raster-downsample 4$"):
        raster_stitcher((100_000, 100_000), 2.0, 6, weights, window=256, stride=256, offset=0,
                        budget=12 * 2**30, source="dmmn_m3.onnx")
    raster, _ = raster_stitcher((100_000, 100_000), 2.0, 6, weights, window=256, stride=256, offset=0, factor=16,
                                budget=12 * 2**30)
    assert raster.shape == (3125, 3125) and raster.downsample == 32.0
    with pytest.raises(ConfigError, match="must divide the window"):
        raster_stitcher((1000, 1000), 1.0, 2, weights, window=256, stride=256, offset=0, factor=3)
