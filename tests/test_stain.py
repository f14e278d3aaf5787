"""Macenko stain estimation and augmentation (h2g.data.stain)."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

from h2g.data import stain

# Ruifrok & Johnston's H&E optical density vectors, normalised.
H_TRUE = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
E_TRUE = np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105])


def synthetic_he(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 H&E image from known stains: a quarter glass, the rest random mixes of
    the two stains (some pixels nearly pure in one stain); returns (rgb, concentrations)."""
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.0, 1.5, (size, size, 2))
    conc[: size // 4] = 0.0  # glass
    conc[size // 4 : size // 2, :, 1] *= 0.02  # nearly pure haematoxylin
    conc[size // 2 : 3 * size // 4, :, 0] *= 0.02  # nearly pure eosin
    od = conc @ np.stack([H_TRUE, E_TRUE])
    return stain.od_to_rgb(od), conc


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_od_round_trip_is_exact_for_uint8_and_maps_white_to_zero():
    rgb = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    od = stain.rgb_to_od(rgb)
    assert od[-1, -1] == pytest.approx([0.0, 0.0, 0.0])
    assert od[0, 0, 0] == pytest.approx(np.log(256.0))
    np.testing.assert_array_equal(stain.od_to_rgb(od), rgb)
    np.testing.assert_allclose(stain.od_to_rgb(stain.rgb_to_od(rgb / 255.0), np.float32), rgb / 255.0, atol=1e-6)


def test_estimates_known_stain_vectors_in_h_then_e_order():
    rgb, conc = synthetic_he()
    stains, max_conc = stain.macenko_stains(rgb)
    assert stains.shape == (2, 3) and max_conc.shape == (2,)
    np.testing.assert_allclose(np.linalg.norm(stains, axis=1), 1.0)
    assert cosine(stains[0], H_TRUE) > 0.99
    assert cosine(stains[1], E_TRUE) > 0.99
    tissue = conc.sum(axis=2) > 0
    np.testing.assert_allclose(max_conc, np.percentile(conc[tissue], 99, axis=0), rtol=0.1)


def test_unperturbed_reconstruction_from_estimated_stains_matches_original():
    rgb, _ = synthetic_he()
    stains, _ = stain.macenko_stains(rgb)
    conc = stain.stain_concentrations(rgb, stains)
    assert conc.shape == rgb.shape[:2] + (2,)
    rebuilt = stain.od_to_rgb(conc @ stains).astype(int)
    assert np.abs(rebuilt - rgb).max() <= 3
    assert np.abs(rebuilt - rgb).mean() < 0.5


def test_augmentation_is_deterministic_changes_colour_and_keeps_glass_white():
    rgb, conc = synthetic_he()
    a = stain.stain_augment(rgb, np.random.default_rng(7))
    b = stain.stain_augment(rgb, np.random.default_rng(7))
    c = stain.stain_augment(rgb, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == rgb.shape
    assert not np.array_equal(a, c)
    tissue = conc.sum(axis=2) > 0
    assert np.abs(a[tissue].astype(int) - rgb[tissue]).mean() > 2.0
    np.testing.assert_array_equal(a[~tissue], 255)


def test_augmentation_with_zero_sigmas_is_identity_and_float_images_stay_float():
    rgb, _ = synthetic_he()
    np.testing.assert_array_equal(stain.stain_augment(rgb, np.random.default_rng(0), 0.0, 0.0), rgb)
    as_float = rgb.astype(np.float32) / 255.0
    out = stain.stain_augment(as_float, np.random.default_rng(3))
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    expected = stain.stain_augment(rgb, np.random.default_rng(3)).astype(np.float32) / 255.0
    np.testing.assert_allclose(out, expected, atol=1.0 / 255.0 + 1e-6)


def test_scaling_concentrations_matches_the_model():
    """sigma2 = 0 and a known a: an all-haematoxylin image's OD scales by exactly a."""
    rng = np.random.default_rng(0)
    conc = rng.uniform(0.3, 1.2, (40, 40))
    od = conc[..., None] * H_TRUE + rng.uniform(0.3, 1.2, (40, 40))[..., None] * E_TRUE
    rgb = stain.od_to_rgb(od, np.float64)
    draws = np.random.default_rng(5)
    a = draws.uniform(0.9, 1.1, size=2)
    out = stain.stain_augment(rgb, np.random.default_rng(5), 0.1, 0.0)
    stains, _ = stain.macenko_stains(rgb)
    before, after = stain.stain_concentrations(rgb, stains), stain.stain_concentrations(out, stains)
    np.testing.assert_allclose(after, before * a, rtol=1e-6, atol=1e-9)


def test_too_little_tissue_returns_image_unchanged():
    blank = np.full((32, 32, 3), 250, np.uint8)
    blank[0, :5] = (120, 60, 150)  # five stained pixels are not enough
    with pytest.raises(ValueError, match="too little tissue"):
        stain.macenko_stains(blank)
    out = stain.stain_augment(blank, np.random.default_rng(0))
    np.testing.assert_array_equal(out, blank)
    assert out is not blank


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        stain.macenko_stains(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        stain.macenko_stains(np.zeros((8, 8, 3), np.int32))


def _hue(od_vector: np.ndarray) -> float:
    """Hue in degrees of the colour a unit concentration of a stain transmits."""
    rgb = np.clip(256.0 * np.exp(-od_vector) - 1.0, 0.0, 255.0) / 255.0
    return colorsys.rgb_to_hsv(*rgb)[0] * 360.0


def test_real_camelyon16_patches_give_purple_haematoxylin_and_pink_eosin(real_data):
    files = sorted((real_data / "camelyon16_patches").glob("*/*.png"))
    assert len(files) > 40
    for path in files:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        stains, _ = stain.macenko_stains(rgb)
        h_colour = 256.0 * np.exp(-stains[0]) - 1.0
        e_colour = 256.0 * np.exp(-stains[1]) - 1.0
        h_hue, e_hue = _hue(stains[0]), _hue(stains[1])
        assert h_colour[2] > h_colour[1] + 25, (path.name, h_colour)  # bluish / purple
        assert 240 <= h_hue < 320, (path.name, h_hue)
        assert e_colour[0] > e_colour[1] + 60, (path.name, e_colour)  # pink
        assert e_hue >= 290 or e_hue < 20, (path.name, e_hue)
        assert (e_hue - 240) % 360 > (h_hue - 240) % 360 + 15, path.name  # eosin redder than haematoxylin
