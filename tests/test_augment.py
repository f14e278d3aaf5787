"""Seeded augmentation pipelines (h2g.augment)."""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import stats

from h2g.data import stain
from h2g.data.augment import (
    ClassifierAugmentConfig,
    RefinementAugmentConfig,
    classifier_augmenter,
    refinement_augmenter,
)

N_SEEDS = 300  # binomial tolerance: p = 0.5 gives 150 +- 8.7 per transform


def patch(size: int = 32, seed: int = 0) -> np.ndarray:
    """A random uint8 patch: no flip or rotation of it equals another."""
    return np.random.default_rng(seed).integers(30, 226, (size, size, 3)).astype(np.uint8)


def only(config_cls, **settings):
    """A config with every probability 0 except the ones given (other fields too)."""
    zeros = {f.name: 0.0 for f in dataclasses.fields(config_cls) if f.name.startswith("p_")}
    return config_cls(**{**zeros, **settings})


def assert_binomial_half(successes: int, trials: int, rate: float = 1.0):
    """``successes`` in ``trials`` is consistent with probability 0.5 * rate."""
    assert stats.binomtest(successes, trials, 0.5 * rate).pvalue > 1e-3, (successes, trials, rate)


# ---------------------------------------------------------------- classifier
def test_classifier_defaults_are_the_papers():
    c = ClassifierAugmentConfig()
    assert (c.p_hflip, c.p_vflip, c.p_rot90, c.p_hsv, c.p_brightness) == (0.5,) * 5
    assert (c.hue_shift, c.sat_shift, c.val_shift) == (20, 20, 20)
    assert c.brightness == (0.8, 1.2)


def test_classifier_is_deterministic_per_seed_and_seeds_differ():
    augment, image = classifier_augmenter(), patch()
    outs = [augment(image, s) for s in range(20)]
    again = [augment(image, s) for s in reversed(range(20))][::-1]
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.uint8 and a.shape == image.shape
    assert len({o.tobytes() for o in outs}) >= 18
    fresh = classifier_augmenter()  # a new augmenter: same result
    np.testing.assert_array_equal(fresh(image, 3), outs[3])


def test_classifier_is_the_same_from_any_thread():
    augment, image = classifier_augmenter(), patch(64)
    expected = [augment(image, s) for s in range(40)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: augment(image, s), range(40)))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_classifier_all_probabilities_zero_is_identity():
    image = patch()
    out = classifier_augmenter(only(ClassifierAugmentConfig))(image, 11)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize(
    "name, rate",
    [("p_hflip", 1.0), ("p_vflip", 1.0), ("p_rot90", 0.75), ("p_hsv", 1.0), ("p_brightness", 1.0)],
)
def test_classifier_each_transform_applies_half_the_time(name, rate):
    """Alone, each transform changes the patch in about half the seeds (a 90-degree
    rotation draws k in 0..3, so it changes the patch in 3/4 of the times applied)."""
    augment, image = classifier_augmenter(only(ClassifierAugmentConfig, **{name: 0.5})), patch()
    changed = sum(not np.array_equal(augment(image, s), image) for s in range(N_SEEDS))
    assert_binomial_half(changed, N_SEEDS, rate)


def test_classifier_flips_are_independent():
    """albumentations' Compose(seed=...) gives all transforms the same coin: flips would
    then be applied together or not at all.  Here the four outcomes are equally likely."""
    image = patch()
    augment = classifier_augmenter(only(ClassifierAugmentConfig, p_hflip=0.5, p_vflip=0.5))
    outcomes = {"none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}
    counts = dict.fromkeys(outcomes, 0)
    for s in range(N_SEEDS):
        out = augment(image, s)
        (match,) = [k for k, v in outcomes.items() if np.array_equal(out, v)]
        counts[match] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3, counts


def test_classifier_colour_transforms_stay_in_their_ranges():
    grey = np.full((16, 16, 3), 100, np.uint8)
    brightness = classifier_augmenter(only(ClassifierAugmentConfig, p_brightness=1.0))
    factors = [brightness(grey, s)[0, 0, 0] / 100.0 for s in range(100)]
    assert min(factors) >= 0.79 and max(factors) <= 1.21 and max(factors) - min(factors) > 0.3
    for s in range(20):  # one factor for the whole patch and all channels
        assert len(np.unique(brightness(grey, s))) == 1
    value = classifier_augmenter(only(ClassifierAugmentConfig, p_hsv=1.0))
    for s in range(50):  # a grey patch has no hue or saturation: only V moves, by <= 20
        out = value(grey, s).astype(int)
        assert np.abs(out - 100).max() <= 20


def test_classifier_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        classifier_augmenter()(np.zeros((8, 8, 3), np.float32), 0)


# ---------------------------------------------------------------- refinement
def tissue_image(size: int = 48) -> np.ndarray:
    """A float H&E-like image from known stains (glass on the left quarter)."""
    rng = np.random.default_rng(1)
    conc = rng.uniform(0.2, 1.2, (size, size, 2))
    conc[:, : size // 4] = 0.0
    h = np.array([0.650, 0.704, 0.286])
    e = np.array([0.072, 0.990, 0.105])
    od = conc @ np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)])
    return stain.od_to_rgb(od, np.float32)


def refinement_inputs(size: int = 48):
    image = tissue_image(size)
    heat = np.random.default_rng(2).random((size, size)).astype(np.float32)
    mask = np.zeros((size, size), np.float32)
    mask[5:20, 8:30] = 1.0
    return image, heat, mask


def test_refinement_defaults_are_the_papers():
    c = RefinementAugmentConfig()
    assert (c.p_hflip, c.p_vflip, c.p_rot90, c.p_zoom, c.p_stain) == (0.5,) * 5
    assert c.zoom == (0.8, 1.2) and (c.stain_sigma1, c.stain_sigma2) == (0.1, 0.1)


def test_refinement_is_deterministic_and_keeps_dtypes_and_ranges():
    augment = refinement_augmenter()
    image, heat, mask = refinement_inputs()
    seen = set()
    for s in range(12):
        a, b = augment(image, heat, mask, s), augment(image, heat, mask, s)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        out_image, out_heat, out_mask = a
        assert out_image.dtype == np.float32 and out_image.shape == image.shape
        assert out_heat.dtype == np.float32 and out_heat.shape == heat.shape
        assert out_mask.dtype == np.float32 and set(np.unique(out_mask)) <= {0.0, 1.0}
        assert 0.0 <= out_image.min() and out_image.max() <= 1.0
        assert 0.0 <= out_heat.min() and out_heat.max() <= 1.0
        seen.add(out_image.tobytes())
    assert len(seen) >= 10
    uint8_image = np.rint(image * 255).astype(np.uint8)
    out = augment(uint8_image, heat[..., None], mask.astype(bool), 4)
    assert out[0].dtype == np.uint8 and out[1].shape == heat.shape + (1,) and out[2].dtype == bool


def test_refinement_all_probabilities_zero_is_identity():
    image, heat, mask = refinement_inputs()
    out = refinement_augmenter(only(RefinementAugmentConfig))(image, heat, mask, 5)
    for x, y in zip(out, (image, heat, mask)):
        np.testing.assert_array_equal(x, y)


def test_refinement_flip_moves_everything_to_the_hand_computed_place():
    size = 20
    image = np.ones((size, size, 3), np.float32)
    heat = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint8)
    image[3, 5], heat[3, 5], mask[3, 5] = 0.0, 1.0, 1
    out_image, out_heat, out_mask = refinement_augmenter(only(RefinementAugmentConfig, p_hflip=1.0))(image, heat, mask, 0)
    assert out_image[3, size - 1 - 5].max() == 0.0 and out_heat[3, size - 1 - 5] == 1.0 and out_mask[3, size - 1 - 5] == 1
    assert out_heat.sum() == 1.0 and out_mask.sum() == 1


def _centroid(weights: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(weights.shape)
    return np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()


def test_refinement_geometry_moves_image_heatmap_and_mask_together():
    """A dark square in the image, a hot square in the heatmap and a square in the mask
    at the same place stay at the same place under every flip / rotation / zoom."""
    size = 64
    image = np.ones((size, size, 3), np.float32)
    heat = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.float32)
    image[10:19, 40:49] = 0.0
    heat[10:19, 40:49] = 1.0
    mask[10:19, 40:49] = 1.0
    augment = refinement_augmenter(RefinementAugmentConfig(p_stain=0.0))
    moved = 0
    for s in range(60):
        out_image, out_heat, out_mask = augment(image, heat, mask, s)
        c_image, c_heat, c_mask = _centroid(1.0 - out_image[..., 0]), _centroid(out_heat), _centroid(out_mask)
        np.testing.assert_allclose(c_image, c_heat, atol=1e-3)
        np.testing.assert_allclose(c_mask, c_heat, atol=1.0)
        assert out_mask.sum() == pytest.approx(out_heat.sum(), rel=0.3)
        moved += not np.allclose(c_heat, _centroid(heat))
    assert moved > 30


def test_refinement_zoom_scales_about_the_centre_and_fills_with_glass():
    size = 40
    image, heat, mask = refinement_inputs(size)
    zoom_out = refinement_augmenter(only(RefinementAugmentConfig, p_zoom=1.0, zoom=(0.8, 0.8)))
    out_image, out_heat, out_mask = zoom_out(image, np.ones_like(heat), np.ones_like(mask), 0)
    border = np.zeros((size, size), bool)
    border[:3], border[-3:], border[:, :3], border[:, -3:] = True, True, True, True
    np.testing.assert_array_equal(out_image[border], 1.0)  # white glass
    assert out_heat[border].max() == 0.0 and out_mask[border].max() == 0.0
    assert out_heat[8:32, 8:32].min() == pytest.approx(1.0) and out_mask[8:32, 8:32].min() == 1.0
    assert out_mask.sum() == pytest.approx(0.8**2 * size * size, rel=0.1)


@pytest.mark.parametrize("name, rate", [("p_hflip", 1.0), ("p_vflip", 1.0), ("p_rot90", 0.75), ("p_zoom", 1.0), ("p_stain", 1.0)])
def test_refinement_each_transform_applies_half_the_time(name, rate):
    image, heat, mask = refinement_inputs(24)
    augment = refinement_augmenter(only(RefinementAugmentConfig, **{name: 0.5}))
    changed = sum(not np.array_equal(augment(image, heat, mask, s)[0], image) for s in range(N_SEEDS))
    assert_binomial_half(changed, N_SEEDS, rate)


def test_refinement_stain_changes_the_image_only():
    image, heat, mask = refinement_inputs()
    augment = refinement_augmenter(only(RefinementAugmentConfig, p_stain=1.0))
    out_image, out_heat, out_mask = augment(image, heat, mask, 1)
    np.testing.assert_array_equal(out_heat, heat)
    np.testing.assert_array_equal(out_mask, mask)
    tissue = np.zeros(mask.shape, bool)
    tissue[:, image.shape[1] // 4 :] = True
    assert np.abs(out_image[tissue] - image[tissue]).mean() > 0.005
    np.testing.assert_array_equal(out_image[~tissue], image[~tissue])


def test_refinement_rejects_mismatched_shapes():
    image, heat, mask = refinement_inputs()
    with pytest.raises(ValueError, match="heatmap shape"):
        refinement_augmenter()(image, heat[:10], mask, 0)
    with pytest.raises(ValueError, match="mask shape"):
        refinement_augmenter()(image, heat, mask[:, :10], 0)


# ---------------------------------------------------------------- multi-view (DMMN)
def test_multiview_geometry_moves_every_view_and_the_target_together():
    """A dark square at the same place in three views and a labelled square in the target
    stay together under flips, rotations and elastic deformation; colour jitter is off
    so the views stay comparable.  Deterministic per seed."""
    from h2g.data.augment import MultiviewAugmentConfig, multiview_augmenter

    size = 64
    views = {}
    for name in ("x20", "x10", "x5"):
        v = np.full((size, size, 3), 230, np.uint8)
        v[8:20, 36:50] = 20
        views[name] = v
    target = np.full((size, size), 255, np.uint8)
    target[8:20, 36:50] = 1
    augment = multiview_augmenter(MultiviewAugmentConfig(p_hsv=0.0, p_brightness_contrast=0.0, p_elastic=0.5))
    moved = 0
    for s in range(40):
        out, out_target = augment(views, target, s)
        assert set(out) == set(views) and out_target.dtype == np.uint8
        dark = [_centroid((o[..., 0] < 128).astype(float)) for o in out.values()]
        np.testing.assert_allclose(dark[0], dark[1], atol=1e-6)
        np.testing.assert_allclose(dark[0], dark[2], atol=1e-6)
        np.testing.assert_allclose(_centroid((out_target == 1).astype(float)), dark[0], atol=1.5)
        assert set(np.unique(out_target)) <= {1, 255}  # nearest neighbour: no invented labels
        moved += not np.allclose(dark[0], _centroid((views["x20"][..., 0] < 128).astype(float)))
        again, again_target = augment(views, target, s)
        assert all(np.array_equal(again[k], out[k]) for k in out) and np.array_equal(again_target, out_target)
    assert moved > 20


def test_multiview_colour_jitter_changes_views_not_the_target():
    from h2g.data.augment import MultiviewAugmentConfig, multiview_augmenter

    views = {"x20": patch(32, 1), "x10": patch(32, 2)}
    target = np.random.default_rng(0).integers(0, 3, (32, 32)).astype(np.uint8)
    augment = multiview_augmenter(only(MultiviewAugmentConfig, p_hsv=1.0, p_brightness_contrast=1.0))
    out, out_target = augment(views, target, 3)
    assert np.array_equal(out_target, target)
    assert all(not np.array_equal(out[k], views[k]) for k in views)
    with pytest.raises(ValueError, match="one size"):
        augment({"x20": patch(32), "x10": patch(16)}, None, 0)
