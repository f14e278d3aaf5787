"""Tumour look-alikes of the synthetic cohort: what the tumour is drawn with and the benign
and in situ lesions that mimic it.

The papers reproduced here rest on one claim: tumour needs high-magnification detail and
low-magnification context together.  So the cohort holds regions that only one of the two
separates from invasive carcinoma:

- *mimics that only high magnification separates* (blob-shaped regions of the layout):
  ``adenosis`` (crowded benign glands), ``sclerosing`` (benign cords squeezed in dense
  collagen), ``dcis`` (ducts filled with the slide's own tumour cells, still inside their
  myoepithelial rim and basement membrane: in situ carcinoma) and ``lymphoid`` (dense
  lymphocyte aggregates).  Their epithelium has the tumour's colour and the slide's
  tumour architecture at the scale of glands and nests, so a low-resolution view sees
  tumour; at 10-20x their nuclei are small, even and bland (or, for DCIS, wrapped in
  flat dark myoepithelial nuclei), and tumour nuclei are large, pleomorphic, nucleolated
  and sometimes in mitosis.
- *a mimic that only context separates*: ``nodule``, small round circumscribed benign
  nodules drawn with the tumour's own cells and architecture inside a collagen capsule;
  each 10x patch inside looks like tumour, the region's shape and capsule do not.
  (The other direction, tumour whose patches look like stroma, is the inflamed stroma
  inside the tumour annotation that :mod:`h2g.data.cohort` draws.)

Every function is a pure function of position, keys and the layout, as the rest of the
renderer.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from h2g.data.fields import Grid, as_distance, fraction, smooth_field, um
from h2g.data.nuclei import BENIGN, GRADE1, MYOEPITHELIAL, NONE, NORMAL, ORIENTATIONS, SPINDLE

# Region kinds of the layout's lesions (indices into h2g.data.cohort.REGION_NAMES).
ADENOSIS, SCLEROSING, DCIS, LYMPHOID, NODULE = 6, 7, 8, 9, 10
BLOB_KINDS = (ADENOSIS, SCLEROSING, DCIS, LYMPHOID)  # drawn as smooth blobs
LESION_NAMES = {ADENOSIS: "adenosis", SCLEROSING: "sclerosing", DCIS: "dcis",
                LYMPHOID: "lymphoid", NODULE: "nodule"}

# Carcinoma epithelium per grade: (eosin, haematoxylin) of the cytoplasm, nucleus density.
TUMOUR_EPITHELIUM = {1: ((0.30, 0.20), 0.85), 2: ((0.29, 0.22), 0.85), 3: ((0.27, 0.24), 0.72)}

TUMOUR_MARGIN_UM = 150.0  # lesions keep this far from the tumour
EDGE_MARGIN_UM = 100.0    # ... and this far inside the tissue


def carcinoma(grid: Grid, key: int, grade: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the carcinoma of ``grade`` puts epithelium and lumens on ``grid`` (boolean
    masks): tubules for grade 1, nests (some with a small lumen) for grade 2, solid sheets
    split by thin fibrous septa for grade 3."""
    if grade == 1:
        f1, f2, ident = grid.worley(key, um(45))
        lumen_r = um(3 + 6 * ident)
        outer = lumen_r + um(12 + 5 * fraction(ident, 104.7))
        epithelium = (f1 > lumen_r) & (f1 < outer) & (f2 - f1 > um(2.5))
        lumen = f1 <= lumen_r
    elif grade == 2:
        f1, f2, ident = grid.worley(key, um(60))
        lumen = (fraction(ident, 7919.0) < 0.35) & (f1 < um(2 + 3 * ident))
        epithelium = (f1 < um(20 + 12 * ident)) & (f2 - f1 > um(2.5)) & ~lumen
    else:
        f1, f2, _ = grid.worley(key, um(140))
        epithelium = f2 - f1 > um(3)
        lumen = np.zeros_like(epithelium)
    return epithelium, lumen


def _orientation_bins(angle: np.ndarray) -> np.ndarray:
    """Sprite orientation bins of nuclei lying tangentially round a point seen at
    ``angle`` (radians, the radial direction)."""
    tangent = (angle + np.pi / 2) % np.pi
    return (np.rint(tangent / np.pi * ORIENTATIONS).astype(np.int64) % ORIENTATIONS).astype(np.uint8)


def _paint(st, where, e=None, h=None, kind=None, p_type=None, p_lymph=None, orientation=None):
    """Set the structure's fields on ``where`` (scalars or arrays over the grid)."""
    for name, value in (("e", e), ("h", h), ("kind", kind), ("p_type", p_type),
                        ("p_lymph", p_lymph), ("orientation", orientation)):
        if value is None:
            continue
        target = getattr(st, name)
        target[where] = value[where] if isinstance(value, np.ndarray) else value


def draw_lesions(grid: Grid, keys: dict, grade: int, kinds: np.ndarray, depth: np.ndarray, st) -> None:
    """Draw the lesions on ``grid`` into the structure ``st``: ``kinds`` is the region
    kind per pixel (0 outside lesions), ``depth`` the signed distance (level-0 px) inside
    the lesion (the nodules' capsule follows it)."""
    (colour_e, colour_h), density = TUMOUR_EPITHELIUM[grade]
    tumour_kind = GRADE1 + grade - 1
    inside = kinds > 0
    st.p_lymph[inside] = np.minimum(st.p_lymph[inside], 0.03)

    where = kinds == ADENOSIS  # crowded benign glands in the tumour's colour
    if where.any():
        f1, f2, ident, angle = grid.worley(keys["lesion_glands"], um(45 if grade == 1 else 52), points=True)
        lumen_r = um(2 + 3 * ident)
        outer = lumen_r + um(13 + 6 * fraction(ident, 104.7))
        gland = where & (f1 < outer) & (f2 - f1 > um(2.5))
        lumen = gland & (f1 <= lumen_r)
        rim = gland & (f1 > outer - um(3.5))
        luminal = gland & ~lumen & ~rim
        _paint(st, luminal, e=colour_e, h=colour_h + 0.06, kind=BENIGN, p_type=0.95, p_lymph=0.0)
        _paint(st, rim, e=colour_e, h=colour_h + 0.06, kind=MYOEPITHELIAL, p_type=0.9, p_lymph=0.0,
               orientation=_orientation_bins(angle))
        _paint(st, lumen, e=0.04, h=0.0, kind=NONE, p_type=0.0, p_lymph=0.0)
        _paint(st, where & ~gland, e=0.45)

    where = kinds == SCLEROSING  # benign cords along cell edges, dense collagen between
    if where.any():
        f1, f2, ident, angle = grid.worley(keys["lesion_glands"], um(34), points=True)
        edge = f2 - f1
        cord = where & (edge < um(9))
        rim = cord & (edge > um(6))
        _paint(st, where & ~cord, e=0.4, h=0.05, kind=SPINDLE, p_type=0.1)
        _paint(st, cord & ~rim, e=colour_e, h=colour_h + 0.02, kind=BENIGN, p_type=0.95, p_lymph=0.0)
        _paint(st, rim, e=colour_e, h=colour_h + 0.02, kind=MYOEPITHELIAL, p_type=0.9, p_lymph=0.0,
               orientation=_orientation_bins(angle))

    where = kinds == DCIS  # the tumour's cells filling ducts that keep their rim
    if where.any():
        f1, f2, ident, angle = grid.worley(keys["lesion_ducts"], um(100), points=True)
        radius = um(32 + 20 * ident)
        apart = f2 - f1 > um(10)
        duct = where & (f1 < radius) & apart
        rim = duct & (f1 > radius - um(3.5))
        membrane = where & ~duct & (f1 < radius + um(2.5)) & apart
        inner = duct & ~rim
        _paint(st, inner, e=colour_e, h=colour_h, kind=tumour_kind, p_type=density, p_lymph=0.0)
        _paint(st, rim, e=colour_e, h=colour_h, kind=MYOEPITHELIAL, p_type=0.9, p_lymph=0.0,
               orientation=_orientation_bins(angle))
        _paint(st, membrane, e=0.55, h=0.03, kind=NONE, p_type=0.0)
        if grade == 3:  # comedo necrosis: pale pink debris in the duct's centre
            necrosis = inner & (f1 < 0.45 * radius)
            _paint(st, necrosis, e=0.34, h=0.09, kind=NONE, p_type=0.0, p_lymph=0.12)
        else:           # cribriform spaces
            c1, _, cid = grid.worley(keys["lesion_cribriform"], um(16))
            holes = inner & (c1 < um(2.5 + 2 * cid)) & (fraction(ident, 31.3) < 0.7)
            _paint(st, holes, e=0.04, h=0.0, kind=NONE, p_type=0.0, p_lymph=0.0)

    where = kinds == LYMPHOID  # dense lymphocytes with paler germinal centres
    if where.any():
        f1, _, ident = grid.worley(keys["lesion_ducts"] + 7, um(160))
        centre = where & (f1 < um(25 + 20 * ident)) & (fraction(ident, 57.1) < 0.6)
        _paint(st, where, e=0.24, h=0.12, kind=NONE, p_type=0.0, p_lymph=0.8)
        _paint(st, centre, e=0.26, h=0.14, kind=NORMAL, p_type=0.45, p_lymph=0.45)

    where = kinds == NODULE  # the tumour's cells and architecture inside a capsule
    if where.any():
        epithelium, lumen = carcinoma(grid, keys["lesion_nodule"], grade)
        capsule = where & (depth < um(22))
        core = where & ~capsule
        _paint(st, core & epithelium, e=colour_e, h=colour_h, kind=tumour_kind, p_type=density, p_lymph=0.02)
        _paint(st, core & lumen, e=0.04, h=0.0, kind=NONE, p_type=0.0, p_lymph=0.0)
        _paint(st, capsule, e=0.56, h=0.05, kind=SPINDLE, p_type=0.16, p_lymph=0.0)


# ------------------------------------------------------------------------------- layout

def draw_lesion_layout(rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray, inside: np.ndarray,
                       spacing: float, longest: float, share: float, nodules: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesions on the layout's coarse grid: a signed-distance field (> 0 inside a lesion,
    level-0 px) and the region kind of each cell (every cell gets its nearest lesion's
    kind, so that resampling the map never invents a kind at a lesion's edge).

    Blobs of a smooth field cover ``share`` of the tissue that is away from the tumour
    and the tissue's edge; each blob gets one of :data:`BLOB_KINDS` (a shuffled cycle,
    so a slide with four blobs or more has every kind); then ``nodules`` discs of
    120-250 um radius where they fit."""
    far = inside & (tissue > um(EDGE_MARGIN_UM)) & (tumour < -um(TUMOUR_MARGIN_UM))
    bound = np.minimum(tissue - um(EDGE_MARGIN_UM), -tumour - um(TUMOUR_MARGIN_UM))
    lesion = np.full(tissue.shape, -1e6, np.float32)
    kinds = np.zeros(tissue.shape, np.uint8)
    # the share asked for, or most of the room away from the tumour where that is less
    wanted = min(int(share * (inside & (tissue > 0)).sum()), int(0.8 * far.sum()))
    field = smooth_field(rng, tissue.shape, longest / 10 / spacing)  # blobs as large as the tumour's
    if wanted > 0:
        threshold = np.sort(field[far])[-wanted]
        lesion = np.minimum(as_distance(field - threshold, spacing), bound).astype(np.float32)
        blobs, n = ndimage.label(lesion > 0)
        if n:
            order = rng.permutation(np.resize(np.array(BLOB_KINDS, np.uint8), max(n, len(BLOB_KINDS))))
            kinds[blobs > 0] = order[:n][blobs[blobs > 0] - 1]
    rows, cols = tissue.shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32) * spacing
    for _ in range(nodules):
        radius = rng.uniform(um(120), um(250))
        room = far & (bound > radius + um(40)) & (lesion < -radius - um(150))
        if not room.any():
            break
        cy, cx = np.argwhere(room)[rng.integers(room.sum())]
        disc = radius - np.hypot(xx - cx * spacing, yy - cy * spacing)
        lesion = np.maximum(lesion, disc)
        kinds[disc > -2 * spacing] = NODULE
    if (kinds > 0).any():
        _, index = ndimage.distance_transform_edt(kinds == 0, return_indices=True)
        kinds = kinds[tuple(index)]
    return lesion, kinds
