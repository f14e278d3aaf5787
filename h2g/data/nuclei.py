"""Nucleus sprites of the synthetic cohort: per-type banks of randomly shaped, textured
nuclei (haematoxylin amounts) that the renderer stamps on a jittered grid."""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

CELL = 40                 # level-0 px between nucleus grid points (10 um)
CANVAS = 2 * CELL         # a nucleus sprite's canvas; same-parity cells tile it exactly

NONE, LYMPHOCYTE, SPINDLE, ADIPOCYTE, NORMAL, GRADE1, GRADE2, GRADE3 = range(8)
BENIGN, MYOEPITHELIAL, MITOSIS = range(8, 11)
VARIANTS = 32           # sprites per nucleus type (per orientation for oriented types)
ORIENTATIONS = 8        # orientation bins over 180 degrees
ORIENTED = (SPINDLE, MYOEPITHELIAL)  # types whose sprites come per orientation bin

# type: (half length px, aspect (min, max), stain (min, max), wobble, chromatin, rim,
#        nucleolus probability); level-0 px are 0.25 um
_NUCLEI = {
    LYMPHOCYTE: ((9, 12), (0.85, 1.0), (0.82, 0.95), 0.05, 0.12, 0.0, 0.0),
    SPINDLE: ((17, 26), (0.2, 0.3), (0.62, 0.8), 0.03, 0.12, 0.0, 0.0),
    ADIPOCYTE: ((12, 18), (0.2, 0.3), (0.6, 0.75), 0.03, 0.10, 0.0, 0.0),
    NORMAL: ((12, 15), (0.75, 0.95), (0.58, 0.7), 0.03, 0.15, 0.0, 0.1),
    GRADE1: ((14, 18), (0.75, 0.95), (0.56, 0.72), 0.05, 0.2, 0.1, 0.35),
    GRADE2: ((16, 24), (0.65, 0.95), (0.5, 0.85), 0.09, 0.3, 0.25, 0.65),
    GRADE3: ((18, 30), (0.55, 0.95), (0.4, 0.97), 0.12, 0.42, 0.4, 0.9),
    # benign luminal epithelium (adenosis, sclerosing lesions): small, round, even, bland
    BENIGN: ((11, 14), (0.8, 0.95), (0.6, 0.72), 0.02, 0.12, 0.0, 0.05),
    # myoepithelial cells on the outside of benign glands and in situ ducts: flat, dark
    MYOEPITHELIAL: ((14, 19), (0.22, 0.32), (0.75, 0.92), 0.03, 0.1, 0.0, 0.0),
    # mitotic figures (metaphase plates and clumps): very dark, ragged
    MITOSIS: ((12, 18), (0.3, 0.6), (0.95, 1.0), 0.25, 0.5, 0.0, 0.0),
}
# share of the nuclei of a type drawn as mitoses
MITOTIC_RATE = {GRADE1: 0.003, GRADE2: 0.015, GRADE3: 0.04}


@functools.lru_cache(maxsize=2)
def sprite_bank(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus sprites ``(K, CANVAS, CANVAS)`` uint8 (haematoxylin, 255 = darkest) and
    the index of each type's first sprite, shared by a cohort's slides.  Sprite 0 is
    blank; each type has ``VARIANTS`` sprites (oriented types: per orientation bin), randomly
    shaped, textured and placed within ``CELL / 4`` of the canvas centre (less for the
    largest nuclei, which must fit in the canvas)."""
    rng = np.random.default_rng([seed, 0x5B417E])
    kinds, angles = [], []
    base = np.zeros(len(_NUCLEI) + 1, np.int64)
    count = 1
    for kind in _NUCLEI:
        base[kind] = count
        n = VARIANTS * (ORIENTATIONS if kind in ORIENTED else 1)
        kinds += [kind] * n
        if kind in ORIENTED:
            angles.append(np.repeat(np.arange(ORIENTATIONS) * np.pi / ORIENTATIONS, VARIANTS)
                          + rng.normal(0, 0.08, n))
        else:
            angles.append(rng.uniform(0, np.pi, n))
        count += n
    kinds = np.array(kinds)
    angle = np.concatenate(angles).astype(np.float32)[:, None, None]
    table = np.array([(*_NUCLEI[k][0], *_NUCLEI[k][1], *_NUCLEI[k][2], *_NUCLEI[k][3:])
                      for k in kinds], np.float32)
    n = len(kinds)

    def draw(lo, hi, size=None):
        return rng.uniform(lo, hi, size).astype(np.float32)[..., None, None]

    half = draw(table[:, 0], table[:, 1])
    minor = half * draw(table[:, 2], table[:, 3])
    stain = draw(table[:, 4], table[:, 5])
    wobble, chromatin, rim, nucleolus = (table[:, i, None, None] for i in range(6, 10))
    reach = half * (1 + 3 * wobble)  # the nucleus stays inside its canvas
    centre = CANVAS / 2 + draw(-1, 1, (2, n)) * np.clip(CANVAS / 2 - 1 - reach, 0, CELL / 4)
    yy, xx = (np.mgrid[0:CANVAS, 0:CANVAS] + 0.5).astype(np.float32)
    dx, dy = xx - centre[0], yy - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / half
    v = (dy * cos - dx * sin) / minor
    phi = np.arctan2(v, u)
    edge = 1.0 + sum(wobble * draw(0.3, 1.0, (n,)) * np.cos(k * phi + draw(0, 2 * np.pi, (n,)))
                     for k in (2, 3, 4))
    t = np.hypot(u, v) / edge
    alpha = np.clip((1.0 - t) * minor + 0.5, 0.0, 1.0)
    texture = ndimage.gaussian_filter(rng.standard_normal((n, CANVAS, CANVAS), np.float32),
                                      (0, 1.3, 1.3))
    texture /= texture.std(axis=(1, 2), keepdims=True)
    value = stain * (1 + chromatin * texture) * (1 - rim * (1 - np.clip(t, 0, 1) ** 4))
    dot = draw(-0.35, 0.35, (2, n))
    has_dot = rng.random((n, 1, 1)) < nucleolus
    value += has_dot * 0.35 * np.exp(-((u - dot[0]) ** 2 * half ** 2
                                       + (v - dot[1]) ** 2 * minor ** 2) / (2 * 2.2 ** 2))
    sprites = np.clip(alpha * value * 255, 0, 248).astype(np.uint8)  # + grain <= 255
    return np.concatenate([np.zeros((1, CANVAS, CANVAS), np.uint8), sprites]), base
