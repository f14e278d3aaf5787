"""Macenko stain estimation and stain augmentation for H&E images.

Implemented from Macenko et al., "A method for normalizing histology slides for
quantitative analysis" (ISBI 2009), because no maintained implementation fits this
stack: StainTools (the paper's) needs ``spams`` and ``opencv-python``, torchstain needs
PyTorch, tiatoolbox and HistomicsTK are large toolkits.

The model: optical density ``OD = -ln((I + 1) / 256)`` of an RGB pixel ``I`` (0..255) is
a non-negative mix of two stain vectors, ``OD = c_H * s_H + c_E * s_E``.  The method:

1. drop near-transparent pixels: OD vector norm below ``beta``.  (A per-channel rule,
   "OD below beta in any channel", drops pale pure-eosin pixels, whose red OD is
   small, and biases the eosin vector towards purple on real H&E patches.)
2. take the plane of the two largest eigenvectors of the OD scatter matrix (the
   uncentred second moment, i.e. the SVD of the OD data as in the paper),
3. project the pixels onto that plane and take the ``alpha`` / ``100 - alpha``
   percentiles of their angle as the two extreme stain directions,
4. order them haematoxylin (larger red OD: it absorbs red light) then eosin.

Stain augmentation (as StainTools' ``StainAugmentor`` used by the paper) perturbs each
tissue pixel's concentrations ``C' = a * C + b`` with ``a ~ U(1 - sigma1, 1 + sigma1)``
and ``b ~ U(-sigma2, sigma2)`` drawn once per stain and image.  Background pixels
(glass) are left untouched.  The perturbation is added in OD space
(``OD' = OD + (C' - C) S``), so the part of a pixel the two-stain model does not explain
is kept and an unperturbed image is reproduced exactly.

Everything is numpy only (no TensorFlow).
"""
from __future__ import annotations

import numpy as np

#: An OD vector norm below this marks a pixel as (near) transparent glass: excluded
#: from the stain estimate and left alone by the augmentation (Macenko's beta).
BETA = 0.15
#: Percentile of the angle distribution taken as each extreme stain direction.
ALPHA = 1.0
#: Fewer usable tissue pixels than this and the stains are not estimated.
MIN_TISSUE_PIXELS = 100
#: The estimate uses at most about this many pixels (an even stride over the image):
#: percentiles and a 3x3 scatter matrix need no more, and a 1024x1024 image stays fast.
MAX_ESTIMATE_PIXELS = 65536

_IO = 256.0  # (I + 1) / 256 keeps the logarithm finite at I = 0
_OD_OF_UINT8 = -np.log((np.arange(256) + 1.0) / _IO)  # lookup table for uint8 images


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` of an RGB image, float64, same shape.

    ``rgb`` is ``uint8`` (0..255) or floating point in [0, 1] (scaled by 255)."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _OD_OF_UINT8[rgb]
    intensity = np.clip(rgb.astype(np.float64), 0.0, 1.0) * 255.0
    return -np.log((intensity + 1.0) / _IO)


def od_to_rgb(od: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``uint8`` (rounded) or float in [0, 1], clipped."""
    intensity = np.clip(_IO * np.exp(-od) - 1.0, 0.0, 255.0)
    if np.dtype(dtype) == np.uint8:
        return np.rint(intensity).astype(np.uint8)
    return (intensity / 255.0).astype(dtype)


def macenko_stains(rgb: np.ndarray, beta: float = BETA, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Estimate the H&E stain matrix of an RGB image.

    Returns ``(stain_matrix, max_conc)``: ``stain_matrix`` is ``(2, 3)`` with unit rows,
    haematoxylin first, eosin second, in OD space; ``max_conc`` is ``(2,)``, the 99th
    percentile of each stain's concentration over the tissue pixels.

    Raises ``ValueError`` when fewer than :data:`MIN_TISSUE_PIXELS` pixels have an OD
    norm of at least ``beta`` (a blank or nearly blank image).
    """
    od = rgb_to_od(_check_rgb(rgb)).reshape(-1, 3)
    estimate = _estimate(od, beta, alpha)
    if estimate is None:
        raise ValueError(
            f"too little tissue to estimate stains: fewer than {MIN_TISSUE_PIXELS} pixels with OD norm >= {beta}"
        )
    return estimate


def stain_concentrations(rgb: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations ``(h, w, 2)`` of every pixel for a ``(2, 3)``
    stain matrix: ``OD ~= C @ stain_matrix``."""
    od = rgb_to_od(_check_rgb(rgb))
    return od @ np.linalg.pinv(stain_matrix)


def stain_augment(
    rgb: np.ndarray,
    rng: np.random.Generator,
    sigma1: float = 0.1,
    sigma2: float = 0.1,
    beta: float = BETA,
) -> np.ndarray:
    """Macenko stain augmentation of one RGB image (``uint8`` or float in [0, 1]);
    returns a new image of the same shape and dtype.

    Draws ``a ~ U(1 - sigma1, 1 + sigma1)`` and ``b ~ U(-sigma2, sigma2)`` per stain
    from ``rng`` (always four draws, so the stream stays aligned whatever the image),
    then sets ``C' = a * C + b`` on tissue pixels (OD norm of at least ``beta``).
    An image with too little tissue to estimate stains (see :func:`macenko_stains`) is
    returned unchanged (a copy): there is no stain to perturb.
    """
    rgb = _check_rgb(rgb)
    scale = rng.uniform(1.0 - sigma1, 1.0 + sigma1, size=2)
    shift = rng.uniform(-sigma2, sigma2, size=2)
    od = rgb_to_od(rgb).reshape(-1, 3)
    estimate = _estimate(od, beta, ALPHA)
    if estimate is None:
        return rgb.copy()
    stains, _ = estimate
    tissue = _tissue(od, beta)[:, None]
    conc = od @ np.linalg.pinv(stains)
    od += np.where(tissue, ((scale - 1.0) * conc + shift) @ stains, 0.0)
    return od_to_rgb(od.reshape(rgb.shape), rgb.dtype)


def _estimate(od: np.ndarray, beta: float, alpha: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Macenko's estimate over OD pixels ``(N, 3)``; None with too little tissue."""
    od = od[:: max(1, len(od) // MAX_ESTIMATE_PIXELS)]
    tissue = od[_tissue(od, beta)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        return None
    _, vectors = np.linalg.eigh(tissue.T @ tissue)
    plane = vectors[:, [2, 1]]  # largest eigenvalue first
    if plane[:, 0].sum() < 0:  # OD is non-negative: point the main axis into the data
        plane[:, 0] *= -1
    projected = tissue @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angle, [alpha, 100.0 - alpha])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    stains = np.stack([first, second] if first[0] > second[0] else [second, first])
    conc = tissue @ np.linalg.pinv(stains)
    return stains, np.percentile(conc, 99, axis=0)


def _tissue(od: np.ndarray, beta: float) -> np.ndarray:
    """Pixels ``(N, 3)`` that are not (near) transparent: OD norm of at least beta."""
    return np.einsum("ij,ij->i", od, od) >= beta * beta


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (h, w, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8 and not np.issubdtype(rgb.dtype, np.floating):
        raise ValueError(f"expected a uint8 or floating-point image, got dtype {rgb.dtype}")
    return rgb
