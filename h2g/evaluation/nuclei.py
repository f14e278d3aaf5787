"""Nuclei of an H&E image, measured the same way on synthetic crops and real patches.

- Haematoxylin optical density per pixel by colour deconvolution with the fixed
  Ruifrok-Johnston H&E(-DAB) matrix (:func:`haematoxylin`), Gaussian-smoothed (sigma
  :data:`SMOOTH_PX` px).
- Tissue: optical density norm at least Macenko's beta (:func:`tissue_mask`).
- Threshold: Otsu's on the tissue pixels of the image (so that stain strength differences
  between labs do not decide what a nucleus is) but at least :data:`MIN_NUCLEUS_OD` (so
  that an image with few nuclei does not get a threshold inside its stroma).
- Opening with a 3 x 3 cross, holes filled, objects under :data:`MIN_NUCLEUS_UM2` dropped
  (:func:`nucleus_mask`); ``scipy.ndimage.label``; equivalent diameter ``2 sqrt(area /
  pi)`` in um of the objects not touching the image border (:func:`measure_nuclei`).

Touching nuclei are not split, so crowded tumour reads larger than it is, and pale
vesicular nuclei are partly missed or fragmented, in both alike.  TensorFlow-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from h2g.data.fields import MPP  # the embedded cohort's level-0 um/px
from h2g.data.stain import BETA, rgb_to_od
from h2g.tiling.tissue import otsu_threshold

# Ruifrok & Johnston (2001) optical density vectors of haematoxylin, eosin and DAB.
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RUIFROK_HED = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)
OD_TO_HED = np.linalg.inv(RUIFROK_HED)
H_FULL_SCALE = 2.5      # haematoxylin OD mapped to 255 for Otsu's histogram
MIN_NUCLEUS_OD = 0.25   # the nucleus threshold never goes below this haematoxylin OD
MIN_NUCLEUS_UM2 = 7.0   # smaller objects (< 3 um across) are specks or chromatin fragments
SMOOTH_PX = 2.0         # Gaussian sigma (px, ~0.5 um) applied to the haematoxylin channel


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density per pixel (natural log), by colour deconvolution
    with the Ruifrok-Johnston H, E, DAB matrix."""
    return rgb_to_od(rgb) @ OD_TO_HED[:, 0]


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not glass: optical density norm at least Macenko's beta."""
    od = rgb_to_od(rgb)
    return np.einsum("...c,...c->...", od, od) >= BETA * BETA


@dataclass
class Nuclei:
    """Nuclei measured on one image or pooled over several: ``count`` objects with their
    centre in the measured area, that area's tissue in um^2, the equivalent diameters (um)
    of the objects not touching the image border, and the thresholds used (H OD)."""

    count: int = 0
    tissue_um2: float = 0.0
    diameters: np.ndarray = field(default_factory=lambda: np.zeros(0))
    thresholds: list = field(default_factory=list)

    def __add__(self, other: "Nuclei") -> "Nuclei":
        return Nuclei(self.count + other.count, self.tissue_um2 + other.tissue_um2,
                      np.concatenate([self.diameters, other.diameters]),
                      self.thresholds + other.thresholds)

    @property
    def density(self) -> float | None:
        """Nuclei per 1000 um^2 of tissue."""
        return 1000.0 * self.count / self.tissue_um2 if self.tissue_um2 > 0 else None

    def summary(self) -> dict:
        """Count, density and diameter quartiles, rounded, for the tables."""
        q = np.percentile(self.diameters, [25, 50, 75]) if self.diameters.size else [None] * 3
        return {
            "nuclei": self.count,
            "nuclei_per_1000um2": rounded(self.density, 2),
            "diameter_median_um": rounded(q[1], 2),
            "diameter_q1_um": rounded(q[0], 2),
            "diameter_q3_um": rounded(q[2], 2),
            "diameter_iqr_um": rounded(None if q[0] is None else q[2] - q[0], 2),
            "threshold_od_median": rounded(float(np.median(self.thresholds)) if self.thresholds else None, 3),
        }


def rounded(value, digits: int):
    """``value`` rounded to ``digits`` as a float, None kept."""
    return None if value is None else round(float(value), digits)


def nucleus_mask(rgb: np.ndarray, tissue: np.ndarray | None = None,
                 um_per_px: float = MPP) -> tuple[np.ndarray, float]:
    """Nucleus pixels of an RGB image and the haematoxylin OD threshold used (see the
    module doc): smoothed H OD above max(Otsu of the tissue pixels, MIN_NUCLEUS_OD),
    opened, holes filled, specks under MIN_NUCLEUS_UM2 removed."""
    tissue = tissue_mask(rgb) if tissue is None else tissue
    h = ndimage.gaussian_filter(haematoxylin(rgb), SMOOTH_PX)
    scaled = np.clip(np.round(h / H_FULL_SCALE * 255), 0, 255).astype(np.uint8)
    otsu = otsu_threshold(scaled[tissue]) if tissue.any() else 255
    threshold = max(otsu * H_FULL_SCALE / 255, MIN_NUCLEUS_OD)
    mask = (h > threshold) & tissue
    mask = ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(2, 1))
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1) * um_per_px ** 2
        mask = (areas >= MIN_NUCLEUS_UM2)[labels] & (labels > 0)
    return mask, float(threshold)


def measure_nuclei(rgb: np.ndarray, um_per_px: float, area: np.ndarray | None = None) -> Nuclei:
    """Nuclei of an RGB image at ``um_per_px``: those with their centre in ``area``
    (boolean, default all) counted against the tissue of ``area``; equivalent diameters
    ``2 sqrt(area / pi)`` (um) of those not touching the image border."""
    tissue = tissue_mask(rgb)
    mask, threshold = nucleus_mask(rgb, tissue, um_per_px)
    area = np.ones(mask.shape, bool) if area is None else area
    labels, n = ndimage.label(mask)
    tissue_um2 = float((tissue & area).sum()) * um_per_px ** 2
    thresholds = [threshold] if tissue.any() else []
    if n == 0:
        return Nuclei(0, tissue_um2, np.zeros(0), thresholds)
    index = np.arange(1, n + 1)
    pixels = ndimage.sum_labels(np.ones_like(labels), labels, index)
    centres = np.array(ndimage.center_of_mass(mask, labels, index))
    rows = np.clip(np.round(centres[:, 0]).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip(np.round(centres[:, 1]).astype(int), 0, mask.shape[1] - 1)
    inside = area[rows, cols]
    edge = np.zeros(n + 1, bool)
    edge[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    keep = inside & ~edge[1:]
    diameters = 2.0 * np.sqrt(pixels[keep] * um_per_px ** 2 / np.pi)
    return Nuclei(int(inside.sum()), tissue_um2, diameters, thresholds)

