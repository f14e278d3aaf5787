"""The embedded synthetic cohort: H&E-like breast tissue slides with their annotations.

:func:`make_cohort` writes, deterministically from a seed, pyramidal tiled JPEG TIFF
slides (0.25 um/px at level 0, OpenSlide "generic-tiff") and, all derived from one layout
per slide (:meth:`SlideRenderer.regions`), lossless annotations at downsample 4:

    <out>/data_manifest.csv                       # binary tumour masks (H2G-Net)
    <out>/data_manifest_multiclass.csv            # label maps: partial for train/val, full for test (DMMN, RAZN)
    <out>/data_manifest_multiclass.classes.csv    # its class table (h2g.io.classes)
    <out>/data_manifest_bach.csv                  # BACH-like normal / benign / in situ / invasive maps
    <out>/data_manifest_bach.classes.csv
    <out>/data_manifest_geojson.csv               # the binary manifest on the masks' GeoJSON
    <out>/data_manifest_multiclass_geojson.csv    # the multi-class one on the label maps' GeoJSON
    <out>/data_manifest_multiclass_geojson.classes.csv
    <out>/cohort/slides/<id>.tiff
    <out>/cohort/masks/<id>_mask.tiff             # 255 = invasive tumour
    <out>/cohort/labels/<id>_labels.tiff           # full label map, every slide (LABEL_CLASSES)
    <out>/cohort/labels/<id>_partial.tiff          # partial label map, train and val slides
    <out>/cohort/labels/<id>_bach.tiff             # BACH-like map (BACH_CLASSES)
    <out>/cohort/{masks,labels}/<same>.geojson     # each of them as QuPath GeoJSON (not the full preset)

(:mod:`h2g.data.multistain` renders IHC versions of the same layouts for m-UNet.)

How a slide is drawn:

- *layout*, on a coarse grid: smooth random fields give tissue islands on glass, one or a
  few large smooth tumour regions inside the tissue (the annotation: invasive
  carcinoma), fat lobules, and tumour *mimics* away from the tumour
  (:mod:`h2g.data.lesions`): adenosis, sclerosing lesions, DCIS and lymphoid aggregates
  that match the tumour at low resolution and differ at 10-20x, and circumscribed
  nodules of tumour-like cells that only their shape and capsule give away;
- *structure*, at 1 um/px (level-0 / 4), for each region of level 0 being written: wavy
  collagen stroma, fat cells, normal acini, grade-dependent tumour (tubules for grade 1,
  nests for grade 2, solid sheets for grade 3), the mimics, and, inside the annotated
  region, patches of inflamed stroma that look like stroma at patch scale;
- *nuclei*, at level 0: per-type nucleus sprites (:mod:`h2g.data.nuclei`: lymphocytes,
  fibroblasts, benign, myoepithelial, grade 1-3 tumour nuclei, mitoses) on a jittered
  grid, their type and density taken from the structure;
- *look* (:mod:`h2g.data.artefacts`): with a preset's ``artefacts``, each slide has its
  own stain vectors and strengths, glass colour and section-thickness field, and some
  slides out-of-focus patches, a fold or a pen circle.

Beside each mask and label map, :func:`write_slide` writes the same annotation as a
QuPath GeoJSON (:mod:`h2g.io.geojson`: the exact outlines of its pixels, one feature
per class; a partial map gives only its annotated blobs), so the cohort can be run from
polygon annotations as a user's would be (``data_manifest_geojson.csv``,
``data_manifest_multiclass_geojson.csv``).  The ``full`` preset has none (its mask is
25k px a side and it only times deployment).

The label maps come from the same regions (:data:`LABEL_OF_REGION`,
:data:`BACH_OF_REGION`; the tumour mask is exactly the invasive region).  The partial maps
keep them where a smooth noise field of the slide's own keys (a SeedSequence apart from
the pixels' streams, so slides and masks are unchanged by them) exceeds a per-slide
threshold: irregular blobs over ~40% of the tissue, each class at least ~20% annotated, a
quarter of the glass (:meth:`SlideRenderer.render_partial`).

Everything is a pure function of the position and the slide's seed
(:mod:`h2g.data.fields`), so the slide is rendered tile row by tile row
(:func:`h2g.io.pyramid.write_pyramid_tiles`) with bounded memory at any size, and the same
seed gives byte-identical files.  Presets (:data:`PRESETS`): ``tiny`` (tests), ``smoke``
(the quick start: 24 slides of 6-10k px), ``standard`` (12 slides of 30-36k px, tumour on
1-30 % of the tissue) and ``full`` (one ~100k px slide for runtime benchmarks, without
mimics or artefacts).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from h2g.core.atomic import replace_atomically
from h2g.data import lesions
from h2g.data.artefacts import (BACKGROUND, EOSIN, FOLD_GAIN, HAEMATOXYLIN, MAX_OD, SlideLook, draw_look,
                                gaussian_blur, plain_look)
from h2g.data.fields import MPP, Grid, as_distance, fraction as _fraction, hash01, smooth_field, smoothstep as _smoothstep, um
from h2g.data.nuclei import (ADIPOCYTE, BENIGN, CANVAS, CELL, GRADE1, GRADE2, GRADE3, LYMPHOCYTE,
                             MITOSIS, MITOTIC_RATE, MYOEPITHELIAL, NONE, NORMAL, ORIENTATIONS, ORIENTED,
                             SPINDLE, VARIANTS, sprite_bank)
from h2g.core.errors import ConfigError
from h2g.io.classes import sidecar_path
from h2g.io.pyramid import default_downsamples, write_pyramid_tiles

MASK_DOWNSAMPLE = 4       # level-0 px per mask px
STRUCTURE = 4             # level-0 px per structure px (1 um)
COARSE_CELLS = 128        # the layout grid has about this many cells on the long side

MANIFEST_NAME = "data_manifest.csv"
MULTICLASS_MANIFEST_NAME = "data_manifest_multiclass.csv"  # its classes: <stem>.classes.csv
GEOJSON_MANIFEST_NAME = "data_manifest_geojson.csv"  # the binary manifest on the masks' GeoJSON
MULTICLASS_GEOJSON_MANIFEST_NAME = "data_manifest_multiclass_geojson.csv"  # classes: <stem>.classes.csv
PARTIAL_SPLITS = ("train", "val")  # slides whose multi-class annotation is partial
MANIFEST_HEADER = ("slide_id", "slide_path", "annotation_path", "grade", "split")


# --------------------------------------------------------------------------- layout

@dataclass
class SlideLayout:
    """Where tissue, tumour and fat are, as fields on a coarse grid (``spacing`` level-0
    px per cell, cell ``[0, 0]`` at ``origin``) that read as signed distances in level-0
    px: tissue where ``tissue > 0``, tumour (the annotation) where ``tumour > 0``, fat
    where ``fat > 0`` (outside tumour)."""

    size: tuple[int, int]
    grade: int
    spacing: float
    origin: tuple[float, float]
    tissue: np.ndarray
    tumour: np.ndarray
    fat: np.ndarray
    lesion: np.ndarray | None = None       # > 0 inside a tumour mimic (h2g.data.lesions)
    lesion_kind: np.ndarray | None = None  # region kind of each cell's nearest lesion
    look: SlideLook = plain_look()

    TUMOUR_MARGIN_UM = 60.0  # the tumour keeps this far inside the tissue's edge

    @classmethod
    def draw(cls, rng: np.random.Generator, size: tuple[int, int], grade: int,
             attempts: int = 100, tumour_share: tuple[float, float] = (0.2, 0.4),
             lesion_share: tuple[float, float] = (0.0, 0.0), nodules: tuple[int, int] = (0, 0),
             artefacts: bool = False) -> "SlideLayout":
        """A random layout with tissue on ~35-55% of the slide, tumour on ``tumour_share``
        of the tissue, and at least one clearly tumour and one clearly non-tumour 10x
        patch; then tumour mimics (:mod:`h2g.data.lesions`) on ``lesion_share`` of the
        tissue plus ``nodules`` circumscribed nodules, and, with ``artefacts``, the
        slide's own stain colours, blur, fold and pen marks (:mod:`h2g.data.artefacts`)."""
        width, height = size
        longest = max(size)
        spacing = max(16.0, longest / COARSE_CELLS)
        pad = int(np.ceil(2 * CANVAS / spacing)) + 2  # cells beyond the edges, for margins
        shape = (int(np.ceil(height / spacing)) + 2 * pad, int(np.ceil(width / spacing)) + 2 * pad)
        origin = (-pad * spacing, -pad * spacing)
        xs = origin[0] + (np.arange(shape[1]) + 0.5) * spacing
        ys = origin[1] + (np.arange(shape[0]) + 0.5) * spacing
        inside = np.logical_and.outer((ys > 0) & (ys < height), (xs > 0) & (xs < width))
        radius = np.hypot.outer((2 * ys / height - 1), (2 * xs / width - 1))  # 1: edge middles
        border = 12.0 * np.clip(radius - 0.55, 0.0, None) ** 2  # keeps tissue off the edges
        margin = um(cls.TUMOUR_MARGIN_UM)
        for _ in range(attempts):
            t = smooth_field(rng, shape, longest / 7 / spacing) - border
            t = as_distance(t - np.quantile(t[inside], 1 - rng.uniform(0.35, 0.55)), spacing)
            u = smooth_field(rng, shape, longest / 9 / spacing)
            f = smooth_field(rng, shape, longest / 12 / spacing)
            tissue = inside & (t > 0)
            interior = inside & (t > margin)
            wanted = int(rng.uniform(*tumour_share) * tissue.sum())
            if wanted < 1 or interior.sum() <= wanted:
                continue
            threshold = np.sort(u[interior])[-wanted]
            tumour = np.minimum(as_distance(u - threshold, spacing), t - margin)
            normal = tissue & (tumour <= 0)
            f = as_distance(f - np.quantile(f[normal], 1 - rng.uniform(0.15, 0.4)), spacing)
            layout = cls(size, grade, spacing, origin, t, tumour, f)
            if layout.has_both_classes():
                return layout._with_lesions(rng, inside, lesion_share, nodules, artefacts)
        raise RuntimeError(f"no usable layout for a {width}x{height} slide in {attempts} tries")

    def _with_lesions(self, rng, inside, lesion_share, nodules, artefacts) -> "SlideLayout":
        """This layout plus its lesions and look, drawn from ``rng`` after the rest (a
        preset without them draws the same tissue and tumour as before they existed)."""
        longest = max(self.size)
        if lesion_share[1] > 0 or nodules[1] > 0:
            self.lesion, self.lesion_kind = lesions.draw_lesion_layout(
                rng, self.tissue, self.tumour, inside, self.spacing, longest,
                rng.uniform(*lesion_share), int(rng.integers(nodules[0], nodules[1] + 1)),
                )
            self.fat = np.minimum(self.fat, -self.lesion)  # no fat inside lesions
        if artefacts:
            rows, cols = self.tissue.shape
            cells = np.stack(np.meshgrid(self.origin[0] + (np.arange(cols) + 0.5) * self.spacing,
                                         self.origin[1] + (np.arange(rows) + 0.5) * self.spacing), -1)
            self.look = draw_look(rng, self.size, cells[inside & (self.tissue > 0)],
                                  cells[inside & (self.tumour > 0)])
        return self

    def has_both_classes(self, patch: int = 1024, minimum: int = 1) -> bool:
        """Whether at least ``minimum`` patches of ``patch`` level-0 px (256 px at 10x) are
        clearly tumour (tissue and tumour > 50%) and as many clearly non-tumour (> 50%
        stroma-like tissue, i.e. not fat, which tissue detectors may miss, and no tumour
        within 50 um)."""
        width, height = self.size
        grid = Grid(0, 0, (height // patch * 16, width // patch * 16), patch // 16)
        if min(grid.shape) == 0:
            return False

        def per_patch(mask):
            rows, cols = mask.shape
            return mask.reshape(rows // 16, 16, cols // 16, 16).mean(axis=(1, 3))

        def sample(field):
            return grid.resample(field, self.spacing, self.origin)

        tissue, tumour, fat = sample(self.tissue) > 0, sample(self.tumour), sample(self.fat) > 0
        clear_tumour = (per_patch(tissue) > 0.5) & (per_patch(tumour > 0) > 0.5)
        clear_normal = (per_patch(tissue & ~fat) > 0.5) & (per_patch(tumour > -um(50)) == 0)
        return clear_tumour.sum() >= minimum and clear_normal.sum() >= minimum


# ------------------------------------------------------------------------- structure

@dataclass
class Structure:
    """A region at 1 um/px: stain amounts (0..1) of haematoxylin ``h`` and eosin ``e``,
    and, for nuclei, the type, its density ``p_type`` (probability per nucleus grid
    point), the density of lymphocytes ``p_lymph`` and the spindle orientation bin."""

    h: np.ndarray
    e: np.ndarray
    kind: np.ndarray
    p_type: np.ndarray
    p_lymph: np.ndarray
    orientation: np.ndarray


# one hash key per random field of a slide
_KEYS = ("rough", "fat_rough", "fat", "fibre_a", "fibre_b", "fibre_mix", "fibre_gap",
         "fibre_density", "lymph", "lobule", "acini", "tumour_stroma", "tumour_stroma_fine",
         "glands", "stain", "nuclei", "variant", "mitosis", "lesion_glands", "lesion_ducts",
         "lesion_cribriform", "lesion_nodule", "fold", "ink", "mottle", "mottle_fine")

# What each pixel of a slide is (SlideRenderer.regions): every label map derives from it.
# Indices 6.. are the tumour mimics of h2g.data.lesions.
REGION_NAMES = ("glass", "stroma", "inflamed_stroma", "fat", "normal_lobule", "invasive",
                "adenosis", "sclerosing", "dcis", "lymphoid", "nodule")
GLASS_R, STROMA_R, INFLAMED_R, FAT_R, LOBULE_R, INVASIVE_R = range(6)
assert all(REGION_NAMES[k] == name for k, name in lesions.LESION_NAMES.items())

# Multi-class label maps (DMMN): the pixel values of cohort/labels/*.tiff, 0 = unannotated.
UNANNOTATED, LABEL_TUMOUR, LABEL_BENIGN, LABEL_STROMA, LABEL_FAT, LABEL_GLASS = range(6)
LABEL_CLASSES = (  # (name, pixel value, colour) in class-index order; "background" is reserved
    ("tumour", LABEL_TUMOUR, "#c80000"),
    ("benign", LABEL_BENIGN, "#00a050"),
    ("stroma", LABEL_STROMA, "#f08cc8"),
    ("fat", LABEL_FAT, "#f0d200"),
    ("glass", LABEL_GLASS, "#dcdcdc"),
)
# The multi-class label of each region kind: lesions are labelled as regions; normal
# lobules on their acini's rings and lumens (the rest of a lobule is stroma).  DCIS is
# non-invasive epithelium: "benign" here (every class must occur in a small cohort's
# validation split), "in_situ" in the BACH-like map.
LABEL_OF_REGION = np.array([LABEL_GLASS, LABEL_STROMA, LABEL_STROMA, LABEL_FAT, LABEL_BENIGN, LABEL_TUMOUR,
                            LABEL_BENIGN, LABEL_BENIGN, LABEL_BENIGN, LABEL_STROMA, LABEL_BENIGN], np.uint8)
# BACH-like four classes (RAZN; Aresta et al. 2019): what is not a lesion is normal, glass too.
BACH_NORMAL, BACH_BENIGN, BACH_IN_SITU, BACH_INVASIVE = 1, 2, 3, 4
BACH_CLASSES = (("normal", BACH_NORMAL, "#f0f0f0"), ("benign", BACH_BENIGN, "#00a050"),
                ("in_situ", BACH_IN_SITU, "#8c3cc8"), ("invasive", BACH_INVASIVE, "#c80000"))
BACH_OF_REGION = np.array([BACH_NORMAL, BACH_NORMAL, BACH_NORMAL, BACH_NORMAL, BACH_NORMAL, BACH_INVASIVE,
                           BACH_BENIGN, BACH_BENIGN, BACH_IN_SITU, BACH_NORMAL, BACH_BENIGN], np.uint8)
BACH_MANIFEST_NAME = "data_manifest_bach.csv"

# hash keys of the partial annotation, from their own SeedSequence (the slide's other
# streams, hence its pixels and mask, are untouched by them)
_LABEL_KEYS = ("partial", "partial_fine")
PARTIAL_SCALES_UM = (400.0, 120.0)  # lattice of the annotation field's two octaves
PARTIAL_TISSUE = 0.4    # share of the tissue annotated
PARTIAL_MIN = 0.2       # a class with a smaller share annotated gets its own threshold ...
PARTIAL_RESCUE = 0.3    # ... that annotates this share of it
PARTIAL_GLASS = 0.25    # share of the glass annotated
STATS_CELLS = 1024      # the partial thresholds are estimated on <= this many cells a side
REUSE_LABEL_PIXELS = 1 << 26  # write_slide keeps label maps up to this size for the partial one


class SlideRenderer:
    """Renders any level-0 region of a slide (and of its mask) from its layout; every
    pixel depends only on its position, the layout and ``key``."""

    def __init__(self, layout: SlideLayout, key: tuple[int, int]):
        """``key`` = (cohort seed, slide index); the seed alone picks the sprite bank."""
        self.layout, self.key = layout, key
        seeds = np.random.SeedSequence([*key, 0xC0FFEE])
        state = seeds.generate_state(len(_KEYS), np.uint64)
        self.keys = {name: int(k) for name, k in zip(_KEYS, state)}
        label_state = np.random.SeedSequence([*key, 0x1ABE15]).generate_state(
            len(_LABEL_KEYS), np.uint64)
        self.label_keys = {name: int(k) for name, k in zip(_LABEL_KEYS, label_state)}
        rng = np.random.default_rng(seeds.spawn(1)[0])
        self.bank, self.bank_base = sprite_bank(key[0])
        angle = rng.uniform(0, np.pi)
        self.fibre_angles = (angle, angle + np.pi / 2 + rng.uniform(-0.5, 0.5))
        # fine grain added to the stain amounts: 0..6 haematoxylin, 0..4 eosin
        self.grain = np.stack([rng.integers(0, top, (256, 256), dtype=np.uint8) for top in (7, 5)])
        self.lut = layout.look.lut()

    # -- structure at 1 um/px
    def tumour(self, grid: Grid) -> np.ndarray:
        """The annotation on ``grid``: True where the layout's tumour field is > 0."""
        layout = self.layout
        return grid.resample(layout.tumour, layout.spacing, layout.origin) > 0

    def tissue(self, grid: Grid) -> np.ndarray:
        """Where ``grid`` is tissue (not glass): the layout's tissue field, roughened."""
        layout = self.layout
        return (grid.resample(layout.tissue, layout.spacing, layout.origin)
                + um(24) * (grid.noise(self.keys["rough"], um(45)) - 0.5)) > 0

    def lesions(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """The lesions on ``grid``: the region kind per pixel (0 outside any lesion; see
        :mod:`h2g.data.lesions`) and the signed distance inside (level-0 px)."""
        layout = self.layout
        if layout.lesion is None:
            return np.zeros(grid.shape, np.uint8), np.full(grid.shape, -1e6, np.float32)
        depth = grid.resample(layout.lesion, layout.spacing, layout.origin)
        kinds = grid.resample(layout.lesion_kind.astype(np.float32), layout.spacing, layout.origin,
                              resample=Image.NEAREST)
        return np.where(depth > 0, np.rint(kinds), 0).astype(np.uint8), depth

    def structure(self, grid: Grid) -> Structure:
        """Stains and nucleus types on ``grid`` (normally 1 um/px)."""
        keys = self.keys
        shape = grid.shape
        st = Structure(*(np.zeros(shape, np.float32) for _ in range(2)),
                       np.zeros(shape, np.uint8), np.zeros(shape, np.float32),
                       np.zeros(shape, np.float32), np.zeros(shape, np.uint8))
        tissue = self.tissue(grid)
        if not tissue.any():
            return st
        tumour = self.tumour(grid)
        kinds, depth = self.lesions(grid)
        lesion = kinds > 0
        self._stroma(grid, st)
        fat = self._fat(grid, tumour | lesion, st)
        self._acini(grid, ~tumour & ~lesion & (fat < 0.5), st)
        if lesion.any():
            lesions.draw_lesions(grid, keys, self.layout.grade, kinds, depth, st)
        if tumour.any():
            self._tumour(grid, tumour, st)
        # mottled cytoplasm and matrix over a few microns, then the section's thickness
        # (lattices of 8 and 32 level-0 px: dyadic steps of the 4 px grid, so tiles agree exactly)
        mottle = 0.6 * grid.noise(keys["mottle"], um(8)) + 0.4 * grid.noise(keys["mottle_fine"], um(2))
        st.e *= 0.8 + 0.4 * mottle
        st.h += 0.05 * mottle * (st.kind != ADIPOCYTE)
        thickness = self.layout.look.thickness
        variation = 1 - thickness + 2 * thickness * grid.noise(keys["stain"], um(400))
        st.e *= variation
        st.h *= variation
        glass = ~tissue
        for values in (st.h, st.e, st.kind, st.p_type, st.p_lymph):
            values[glass] = 0
        return st

    def inflamed(self, grid: Grid) -> np.ndarray:
        """How inflamed the stroma is on ``grid`` (0..1; lymphocyte patches)."""
        return _smoothstep(0.62, 0.8, grid.noise(self.keys["lymph"], um(110)))

    def _stroma(self, grid: Grid, st: Structure) -> None:
        """Collagen: pink with thin, wavy, broken pale clefts running in two directions
        mixed by a slow field; sparse spindle nuclei along the fibres and patches of
        inflammation (lymphocytes)."""
        keys = self.keys
        xs, ys = grid.centres()
        k = 2 * np.pi / um(14)
        mix = _smoothstep(0.35, 0.65, grid.noise(keys["fibre_mix"], um(220)))
        clefts, directions = [], []
        for angle, name in zip(self.fibre_angles, ("fibre_a", "fibre_b")):
            phase = (k * (xs * np.cos(angle) + ys * np.sin(angle))
                     + 10.0 * grid.noise(keys[name], um(70)))
            clefts.append(_smoothstep(0.75, 0.97, np.sin(phase)))
            directions.append(int(round(((angle + np.pi / 2) % np.pi) / np.pi * ORIENTATIONS))
                              % ORIENTATIONS)
        cleft = mix * clefts[0] + (1 - mix) * clefts[1]
        cleft *= _smoothstep(0.3, 0.7, grid.noise(keys["fibre_gap"], um(25)))
        density = 0.85 + 0.3 * grid.noise(keys["fibre_density"], um(35))
        st.e[:] = 0.42 * density * (1 - 0.6 * cleft)
        st.h[:] = 0.04
        st.kind[:] = SPINDLE
        st.p_type[:] = 0.12
        st.orientation[:] = np.where(mix > 0.5, directions[0], directions[1])
        st.p_lymph[:] = 0.03 + 0.5 * self.inflamed(grid)

    def fat_weight(self, grid: Grid, tumour: np.ndarray) -> np.ndarray:
        """How much of each pixel of ``grid`` is fat (0..1; adipocytes where > 0.5): the
        layout's fat field, roughened, outside ``tumour``."""
        layout = self.layout
        field = (grid.resample(layout.fat, layout.spacing, layout.origin)
                 + um(30) * (grid.noise(self.keys["fat_rough"], um(80)) - 0.5))
        return _smoothstep(-um(2), um(2), field) * ~tumour

    def _fat(self, grid: Grid, tumour: np.ndarray, st: Structure) -> np.ndarray:
        """Adipocytes (large empty cells with thin membranes) where the fat field is > 0
        outside tumour; returns the fat weight."""
        weight = self.fat_weight(grid, tumour)
        if not weight.any():
            return weight
        f1, f2, _ = grid.worley(self.keys["fat"], um(70))
        membrane = 1.0 - _smoothstep(um(0.8), um(2.2), f2 - f1)
        st.e[:] = st.e * (1 - weight) + weight * (0.01 + 0.45 * membrane)
        st.h[:] = st.h * (1 - weight) + weight * 0.03 * membrane
        is_fat = weight > 0.5
        st.kind[is_fat] = ADIPOCYTE
        st.p_type[is_fat] = 0.5 * membrane[is_fat]
        st.p_lymph[is_fat] = 0.0
        return weight

    def acini(self, grid: Grid, where: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The epithelial rings and lumens of the normal acini on ``grid`` within
        ``where`` (boolean masks), or ``None`` where there are none."""
        lobule = grid.noise(self.keys["lobule"], um(300))
        present_p = np.clip((lobule - 0.6) * 6, 0, 0.95) * where
        if not present_p.any():
            return None
        f1, f2, ident = grid.worley(self.keys["acini"], um(55))
        present = (_fraction(ident, 7919.0) < present_p) & (f2 - f1 > um(2))
        lumen_r = um(2.5 + 4 * ident)
        ring = present & (f1 > lumen_r) & (f1 < lumen_r + um(11 + 5 * _fraction(ident, 104.7)))
        lumen = present & (f1 <= lumen_r)
        return ring, lumen

    def _acini(self, grid: Grid, where: np.ndarray, st: Structure) -> None:
        """Normal lobules: clusters of small acini (lumen, epithelial ring) in stroma."""
        found = self.acini(grid, where)
        if found is None:
            return
        ring, lumen = found
        st.e[ring], st.h[ring], st.kind[ring], st.p_type[ring] = 0.30, 0.17, NORMAL, 0.95
        st.p_lymph[ring | lumen] = 0.0
        st.e[lumen], st.h[lumen], st.p_type[lumen] = 0.04, 0.0, 0.0

    def _tumour(self, grid: Grid, tumour: np.ndarray, st: Structure) -> None:
        """Grade-dependent carcinoma inside the annotation, with islands of inflamed
        stroma that look like the stroma outside."""
        keys, grade = self.keys, self.layout.grade
        q = (0.65 * grid.noise(keys["tumour_stroma"], um(170))
             + 0.35 * grid.noise(keys["tumour_stroma_fine"], um(60)))
        st.p_lymph[tumour] = np.maximum(st.p_lymph[tumour],
                                        0.03 + 0.45 * _smoothstep(0.55, 0.75, q[tumour]))
        epithelium, lumen = lesions.carcinoma(grid, keys["glands"], grade)
        colour, density = lesions.TUMOUR_EPITHELIUM[grade]
        carcinoma = tumour & (q <= 0.6)
        epithelium &= carcinoma
        lumen &= carcinoma
        st.e[epithelium], st.h[epithelium] = colour
        st.kind[epithelium] = GRADE1 + grade - 1
        st.p_type[epithelium] = density
        st.p_lymph[epithelium] = 0.02
        st.e[lumen], st.h[lumen], st.p_type[lumen], st.p_lymph[lumen] = 0.04, 0.0, 0.0, 0.0

    # -- level 0
    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The level-0 RGB region ``(h, w, 3)`` at ``(x, y)``: the stained section
        (:meth:`stained`), out of focus where the look's blur reaches, under the pen."""
        look = self.layout.look
        blur = look.blur_weight(x, y, w, h)
        if blur is None or not blur.any():
            rgb = self.stained(x, y, w, h)
        else:
            m = int(np.ceil(3 * look.blur_sigma))
            big = self.stained(x - m, y - m, w + 2 * m, h + 2 * m)
            sharp = big[m:m + h, m:m + w].astype(np.float32)
            soft = gaussian_blur(big, look.blur_sigma)[m:m + h, m:m + w]
            rgb = np.rint(sharp + (soft - sharp) * blur[..., None]).astype(np.uint8)
        alpha = look.pen_alpha(x, y, w, h, lambda: Grid(x, y, (h, w), 1).noise(self.keys["ink"], um(150)))
        if alpha is not None:
            a = alpha[..., None]
            rgb = np.rint(rgb * (1 - a) + look.ink() * a).astype(np.uint8)
        return rgb

    def stained(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The level-0 RGB region of the stained section alone (with its fold)."""
        sx0, sy0 = x // STRUCTURE - 3, y // STRUCTURE - 3  # room for the blur and bilinear
        cols = -(-(x + w) // STRUCTURE) + 3 - sx0
        rows = -(-(y + h) // STRUCTURE) + 3 - sy0
        grid = Grid(sx0 * STRUCTURE, sy0 * STRUCTURE, (rows, cols), STRUCTURE)
        st = self.structure(grid)
        box = ((x - grid.x0) / STRUCTURE, (y - grid.y0) / STRUCTURE,
               (x + w - grid.x0) / STRUCTURE, (y + h - grid.y0) / STRUCTURE)

        def upsample(values):  # soften 1-um steps, then to level 0
            values = ndimage.gaussian_filter(values, 0.8, truncate=2.5)
            image = Image.fromarray(np.clip(values * 255, 0, 255).astype(np.uint8))
            return np.asarray(image.resize((w, h), Image.BILINEAR, box=box)).copy()

        haem, eosin = upsample(st.h), upsample(st.e)
        np.maximum(haem, self._nuclei(x, y, w, h), out=haem)
        haem += self._grain(0, x, y, w, h)
        eosin += self._grain(1, x, y, w, h)
        fold = self.layout.look.fold_weight(
            Grid(x, y, (h, w), 1), lambda g: um(30) * (g.noise(self.keys["fold"], um(300)) - 0.5))
        if fold is not None:
            gain = 1 + (FOLD_GAIN - 1) * fold
            haem = np.clip(haem * gain, 0, 255).astype(np.uint8)
            eosin = np.clip(eosin * gain, 0, 255).astype(np.uint8)
        return stain_rgb(haem, eosin, self.lut)

    def render_mask(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The mask region ``(h, w)`` (255 = tumour) at mask pixel ``(x, y)``."""
        grid = Grid(x * MASK_DOWNSAMPLE, y * MASK_DOWNSAMPLE, (h, w), MASK_DOWNSAMPLE)
        return self.tumour(grid).astype(np.uint8) * 255

    # -- multi-class label maps (DMMN), on the mask grid
    def regions(self, grid: Grid) -> np.ndarray:
        """What each pixel of ``grid`` is: uint8 indices into :data:`REGION_NAMES`, from
        the pieces :meth:`structure` draws (every label map derives from it): glass off
        the tissue; in the tissue stroma, inflamed stroma, fat where the fat weight is >
        0.5 (adipocytes), the rings and lumens of normal acini, the lesions' kinds; and
        invasive tumour wherever the annotation is (exactly :meth:`tumour`)."""
        tumour = self.tumour(grid)
        out = np.full(grid.shape, GLASS_R, np.uint8)
        tissue = self.tissue(grid)
        if tissue.any():
            kinds, _ = self.lesions(grid)
            lesion = tissue & (kinds > 0)
            out[tissue] = STROMA_R
            inflamed = self.inflamed(grid) > 0.5
            out[tissue & inflamed] = INFLAMED_R
            weight = self.fat_weight(grid, tumour | (kinds > 0))
            out[tissue & (weight > 0.5)] = FAT_R
            found = self.acini(grid, ~tumour & (kinds == 0) & (weight < 0.5))
            if found is not None:
                ring, lumen = found
                out[tissue & (ring | lumen)] = LOBULE_R
            out[lesion] = kinds[lesion]
        out[tumour] = INVASIVE_R
        return out

    def labels(self, grid: Grid) -> np.ndarray:
        """The label map on ``grid`` (uint8 pixel values of :data:`LABEL_CLASSES`): the
        regions (:meth:`regions`) through :data:`LABEL_OF_REGION`, so tumour is exactly
        :meth:`tumour`, benign the normal acini, the benign mimics and the DCIS."""
        return LABEL_OF_REGION[self.regions(grid)]

    def bach_labels(self, grid: Grid) -> np.ndarray:
        """The four-class BACH-like map on ``grid`` (:data:`BACH_CLASSES`)."""
        return BACH_OF_REGION[self.regions(grid)]

    def render_bach(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The BACH-like label map region ``(h, w)`` at mask pixel ``(x, y)``."""
        return self.bach_labels(Grid(x * MASK_DOWNSAMPLE, y * MASK_DOWNSAMPLE, (h, w), MASK_DOWNSAMPLE))

    def render_labels(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The full label map region ``(h, w)`` at mask pixel ``(x, y)``."""
        return self.labels(Grid(x * MASK_DOWNSAMPLE, y * MASK_DOWNSAMPLE, (h, w), MASK_DOWNSAMPLE))

    def render_partial(self, x: int, y: int, w: int, h: int,
                       labels: np.ndarray | None = None) -> np.ndarray:
        """The partial label map region ``(h, w)`` at mask pixel ``(x, y)``: the full
        labels (``labels``, when already rendered) where :meth:`annotation_field`
        exceeds the label's threshold (:attr:`partial_thresholds`), :data:`UNANNOTATED`
        elsewhere."""
        grid = Grid(x * MASK_DOWNSAMPLE, y * MASK_DOWNSAMPLE, (h, w), MASK_DOWNSAMPLE)
        labels = self.labels(grid) if labels is None else labels.copy()
        annotated = self.annotation_field(grid) > self.partial_thresholds[labels]
        labels[~annotated] = UNANNOTATED
        return labels

    def annotation_field(self, grid: Grid) -> np.ndarray:
        """Smooth noise (about 0..1) whose high parts are the annotated blobs."""
        (coarse, fine), keys = PARTIAL_SCALES_UM, self.label_keys
        return (0.65 * grid.noise(keys["partial"], um(coarse))
                + 0.35 * grid.noise(keys["partial_fine"], um(fine)))

    @functools.cached_property
    def partial_thresholds(self) -> np.ndarray:
        """float32 threshold of :meth:`annotation_field` per label value (inf for 0).

        Estimated from the labels and field at the centres of a grid of at most
        :data:`STATS_CELLS` cells a side over the whole slide: one threshold annotating
        :data:`PARTIAL_TISSUE` of the tissue, lowered for a tissue class of which it
        would annotate less than :data:`PARTIAL_MIN` to annotate :data:`PARTIAL_RESCUE`
        of that class; glass gets its own, annotating :data:`PARTIAL_GLASS` of it."""
        width, height = self.layout.size
        step = MASK_DOWNSAMPLE * max(1, -(-max(width, height) // (MASK_DOWNSAMPLE * STATS_CELLS)))
        grid = Grid(0, 0, (-(-height // step), -(-width // step)), step)
        labels, field = self.labels(grid), self.annotation_field(grid)
        thresholds = np.full(len(LABEL_CLASSES) + 1, np.inf, np.float32)

        def top(values, share):  # the threshold above which ``share`` of ``values`` lie
            return np.float32(np.quantile(values, 1 - share)) if values.size else np.inf

        common = top(field[labels != LABEL_GLASS], PARTIAL_TISSUE)
        for value in (LABEL_TUMOUR, LABEL_BENIGN, LABEL_STROMA, LABEL_FAT):
            values = field[labels == value]
            thresholds[value] = common
            if values.size and (values > common).mean() < PARTIAL_MIN:
                thresholds[value] = min(common, top(values, PARTIAL_RESCUE))
        thresholds[LABEL_GLASS] = top(field[labels == LABEL_GLASS], PARTIAL_GLASS)
        return thresholds

    def _grain(self, channel: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Fine stain grain (0..6 haematoxylin, 0..4 eosin), periodic over 256 px."""
        tile = self.grain[channel]
        size = tile.shape[0]
        top, left = y % size, x % size
        reps = (-(-(top + h) // size), -(-(left + w) // size))
        return np.tile(tile, reps)[top:top + h, left:left + w]

    def _nuclei(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Haematoxylin of nuclei over the level-0 region: a sprite per nucleus grid
        point (type and density read from the structure at the point), drawn in four
        passes (grid-point parities) whose canvases tile exactly."""
        spans = {}  # parity -> first grid point, count of same-parity points (x and y)
        for parity in (0, 1):
            shift = parity * CELL - CELL // 2
            spans[parity] = [(2 * ((lo - shift) // CANVAS) + parity,
                              -(-(lo + n - shift) // CANVAS) - (lo - shift) // CANVAS)
                             for lo, n in ((x, w), (y, h))]
        ix0 = min(spans[p][0][0] for p in (0, 1))
        iy0 = min(spans[p][1][0] for p in (0, 1))
        ix1 = max(spans[p][0][0] + 2 * spans[p][0][1] for p in (0, 1))
        iy1 = max(spans[p][1][0] + 2 * spans[p][1][1] for p in (0, 1))
        points = Grid(ix0 * CELL, iy0 * CELL, (iy1 - iy0, ix1 - ix0), CELL)
        index = self._sprite_index(self.structure(points), ix0, iy0)
        out = np.zeros((h, w), np.uint8)
        for py in (0, 1):
            (first_y, count_y) = spans[py][1]
            for px in (0, 1):
                (first_x, count_x) = spans[px][0]
                cells = index[first_y - iy0::2][:count_y, first_x - ix0::2][:, :count_x]
                layer = self.bank[cells].transpose(0, 2, 1, 3).reshape(
                    count_y * CANVAS, count_x * CANVAS)
                left = x - (first_x * CELL - CELL // 2)
                top = y - (first_y * CELL - CELL // 2)
                np.maximum(out, layer[top:top + h, left:left + w], out=out)
        return out

    def _sprite_index(self, st: Structure, ix0: int, iy0: int) -> np.ndarray:
        """Bank index of the nucleus at each grid point (``st`` is the structure at the
        points, the first being ``(ix0, iy0)``): its type and density from the
        structure, a position hash deciding presence and variant."""
        rows, cols = st.kind.shape
        ix = np.arange(ix0, ix0 + cols)[None, :]
        iy = np.arange(iy0, iy0 + rows)[:, None]
        draw = hash01(self.keys["nuclei"], ix, iy)
        kind = np.where(draw < st.p_type, st.kind,
                        np.where(draw < st.p_type + st.p_lymph, LYMPHOCYTE, NONE))
        for grade_kind, rate in MITOTIC_RATE.items():  # a few tumour nuclei in mitosis
            kind = np.where((kind == grade_kind) & (hash01(self.keys["mitosis"], ix, iy) < rate),
                            MITOSIS, kind)
        variant = (hash01(self.keys["variant"], ix, iy) * VARIANTS).astype(np.int64)
        variant += np.isin(kind, ORIENTED) * st.orientation.astype(np.int64) * VARIANTS
        return np.where(kind == NONE, 0, self.bank_base[kind] + variant)


# ------------------------------------------------------------------------- colours

def stain_lut() -> np.ndarray:
    """The plain look's stain table (:meth:`h2g.data.artefacts.SlideLook.lut`)."""
    return plain_look().lut()


def stain_rgb(haematoxylin: np.ndarray, eosin: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGB ``(h, w, 3)`` uint8 of per-pixel stain amounts (uint8 ``(h, w)`` each)."""
    index = haematoxylin.astype(np.uint16)
    index <<= 8
    index |= eosin
    return np.take(lut, index, axis=0)


@dataclass(frozen=True)
class Preset:
    """A cohort's shape: one grade and split per slide, the range of level-0 sides, the
    share of the tissue that is tumour and that is tumour mimics (plus a number of
    circumscribed nodules per slide), and whether slides get their own stain colours and
    scanning artefacts (:mod:`h2g.data.artefacts`)."""

    name: str
    prefix: str
    grades: tuple[int, ...]
    splits: tuple[str, ...]
    sides: tuple[int, int]
    tumour_share: tuple[float, float] = (0.2, 0.4)
    lesion_share: tuple[float, float] = (0.0, 0.0)
    nodules: tuple[int, int] = (0, 0)
    artefacts: bool = False
    geojson: bool = True  # write each annotation as GeoJSON too


def _balanced(per_split: dict[str, int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Grades cycling 1, 2, 3 within each split; ``per_split`` counts slides per grade."""
    grades, splits = [], []
    for split, per_grade in per_split.items():
        for _ in range(per_grade):
            for grade in (1, 2, 3):
                grades.append(grade)
                splits.append(split)
    return tuple(grades), tuple(splits)


PRESETS = {
    "tiny": Preset("tiny", "t", (1, 2, 3, 1, 2, 3),
                   ("train", "train", "train", "val", "test", "test"), (4096, 4608),
                   lesion_share=(0.1, 0.2), nodules=(0, 1)),
    "smoke": Preset("smoke", "s", *_balanced({"train": 4, "val": 2, "test": 2}), (6144, 10240),
                    lesion_share=(0.1, 0.2), nodules=(0, 2), artefacts=True),
    # closer to real scale: 7.5-9 mm square sections, realistic tumour shares
    "standard": Preset("standard", "m", *_balanced({"train": 2, "val": 1, "test": 1}), (30_000, 36_000),
                       tumour_share=(0.01, 0.3), lesion_share=(0.1, 0.25), nodules=(1, 4), artefacts=True),
    # one ~100k x 100k slide for runtime benchmarks (the look of the cohort before mimics)
    "full": Preset("full", "f", (2,), ("test",), (96_000, 104_000), geojson=False),
}


@dataclass(frozen=True)
class SlideSpec:
    """One slide of a cohort: its manifest row and the seed material of its pixels."""

    slide_id: str
    grade: int
    split: str
    index: int
    geojson: bool = True

    @property
    def slide_path(self) -> str:
        return f"cohort/slides/{self.slide_id}.tiff"

    @property
    def annotation_path(self) -> str:
        return f"cohort/masks/{self.slide_id}_mask.tiff"

    @property
    def labels_path(self) -> str:
        """The full multi-class label map (every slide)."""
        return f"cohort/labels/{self.slide_id}_labels.tiff"

    @property
    def partial_path(self) -> str | None:
        """The partial label map (train and val slides; ``None`` for test slides)."""
        if self.split not in PARTIAL_SPLITS:
            return None
        return f"cohort/labels/{self.slide_id}_partial.tiff"

    @property
    def bach_path(self) -> str:
        """The four-class BACH-like label map (every slide)."""
        return f"cohort/labels/{self.slide_id}_bach.tiff"

    @property
    def multiclass_annotation_path(self) -> str:
        """The annotation of the multi-class manifest: partial labels where there are
        some, else the full labels."""
        return self.partial_path or self.labels_path

    @property
    def rasters(self) -> tuple[str, ...]:
        """The slide and its annotation images."""
        return tuple(p for p in (self.slide_path, self.annotation_path, self.labels_path,
                                 self.partial_path, self.bach_path) if p is not None)

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every file :func:`write_slide` writes for the slide: :attr:`rasters`, then the
        annotations' GeoJSON (each after its image)."""
        rasters = self.rasters
        if not self.geojson:
            return rasters
        return rasters + tuple(geojson_path(p) for p in rasters[1:])


def geojson_path(path: str) -> str:
    """The GeoJSON beside the annotation image ``path`` (``.tiff`` -> ``.geojson``)."""
    return path[: -len(".tiff")] + ".geojson"


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (ConfigError naming the choices otherwise)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown cohort preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def cohort_specs(preset_name: str) -> list[SlideSpec]:
    """The slides of a preset, in manifest order."""
    p = get_preset(preset_name)
    width = max(2, len(str(len(p.grades))))
    return [SlideSpec(f"{p.prefix}{i + 1:0{width}d}", g, s, i, p.geojson)
            for i, (g, s) in enumerate(zip(p.grades, p.splits))]


def manifest_text(preset_name: str, multiclass: bool = False, bach: bool = False, geojson: bool = False) -> str:
    """The manifest :func:`make_cohort` writes for a preset (it does not depend on the
    seed: the seed only changes pixels): the binary tumour masks, or with ``multiclass``
    the label maps (:data:`MULTICLASS_MANIFEST_NAME`; partial for train and val slides,
    full for test slides) whose classes are :func:`classes_text`; with ``geojson`` the
    same annotations' GeoJSON files."""
    lines = [",".join(MANIFEST_HEADER)]
    for spec in cohort_specs(preset_name):
        annotation = (spec.bach_path if bach else spec.multiclass_annotation_path if multiclass
                      else spec.annotation_path)
        if geojson:
            annotation = geojson_path(annotation)
        lines.append(f"{spec.slide_id},{spec.slide_path},{annotation},{spec.grade},{spec.split}")
    return "\n".join(lines) + "\n"


def manifest_texts(preset_name: str) -> dict[str, tuple[str, str | None]]:
    """Every manifest of a preset: file name -> (text, class table text or None)."""
    out = {MANIFEST_NAME: (manifest_text(preset_name), None),
           MULTICLASS_MANIFEST_NAME: (manifest_text(preset_name, multiclass=True), classes_text()),
           BACH_MANIFEST_NAME: (manifest_text(preset_name, bach=True), classes_text(bach=True))}
    if get_preset(preset_name).geojson:
        out[GEOJSON_MANIFEST_NAME] = (manifest_text(preset_name, geojson=True), None)
        out[MULTICLASS_GEOJSON_MANIFEST_NAME] = (manifest_text(preset_name, multiclass=True, geojson=True),
                                                 classes_text())
    return out


def classes_text(bach: bool = False) -> str:
    """The class table sidecar of the multi-class manifest (see :mod:`h2g.io.classes`),
    or with ``bach`` of the BACH-like one: the classes in index order, then the
    ``ignore`` row of unannotated pixels."""
    rows = ["name,value,colour"]
    rows += [f"{name},{value},{colour}" for name, value, colour in (BACH_CLASSES if bach else LABEL_CLASSES)]
    rows.append(f"ignore,{UNANNOTATED},")
    return "\n".join(rows) + "\n"


# Sides are multiples of 16, so pyramid levels are exactly 1/4 and 1/16 of level 0 and a
# 10x patch sits on the tile grid of level 1 (a downsample of 3.9992 instead of 4 makes
# every patch read decode four JPEG tiles instead of one).
SIDE_MULTIPLE = 16


def _slide_stream(preset_name: str, spec: SlideSpec, seed: int):
    """A slide's random stream and its level-0 size (the stream's first draw, rounded
    down to a multiple of :data:`SIDE_MULTIPLE`)."""
    low, high = get_preset(preset_name).sides
    rng = np.random.default_rng([seed, spec.index, 0x5EED])
    width, height = (int(v) // SIDE_MULTIPLE * SIDE_MULTIPLE for v in rng.integers(low, high + 1, size=2))
    return rng, (width, height)


def slide_size(preset_name: str, spec: SlideSpec, seed: int) -> tuple[int, int]:
    """The level-0 (width, height) of one slide."""
    return _slide_stream(preset_name, spec, seed)[1]


def slide_layout(preset_name: str, spec: SlideSpec, seed: int) -> SlideLayout:
    """The layout (size, tissue, tumour, fat) of one slide, from ``seed`` and its index."""
    rng, size = _slide_stream(preset_name, spec, seed)
    p = get_preset(preset_name)
    return SlideLayout.draw(rng, size, spec.grade, tumour_share=p.tumour_share, lesion_share=p.lesion_share,
                            nodules=p.nodules, artefacts=p.artefacts)




def write_slide(out_dir: Path, preset_name: str, spec: SlideSpec, seed: int,
                progress=None, only=None, render_workers: int = 1) -> tuple[int, int]:
    """Render one slide, its tumour mask and its label maps (:attr:`SlideSpec.outputs`)
    under ``out_dir``, or only those of them named in ``only``; returns the level-0 size.
    Masks and label maps are lossless single-channel pyramids at downsample 4.
    ``render_workers`` > 1 renders the slide image and the tumour mask in that many
    processes (:func:`~h2g.io.pyramid.write_pyramid_tiles`: the same files)."""
    layout = slide_layout(preset_name, spec, seed)
    renderer = SlideRenderer(layout, key=(seed, spec.index))
    mask_size = tuple(-(-side // MASK_DOWNSAMPLE) for side in layout.size)
    wanted = [p for p in spec.outputs if only is None or p in only]
    # the partial map reuses the full one's regions when both are written and it is small
    reuse = ({} if spec.partial_path in wanted and spec.labels_path in wanted
             and mask_size[0] * mask_size[1] <= REUSE_LABEL_PIXELS else None)

    def render_labels(x, y, w, h):
        labels = renderer.render_labels(x, y, w, h)
        if reuse is not None:
            reuse[x, y, w, h] = labels
        return labels

    def render_partial(x, y, w, h):
        labels = reuse.pop((x, y, w, h), None) if reuse is not None else None
        return renderer.render_partial(x, y, w, h, labels=labels)

    renders = {spec.slide_path: None, spec.annotation_path: renderer.render_mask,
               spec.labels_path: render_labels, spec.partial_path: render_partial,
               spec.bach_path: renderer.render_bach}
    for path in wanted:  # the full labels before the partial ones, each image before its GeoJSON
        if path.endswith(".geojson"):
            write_annotation_geojson(out_dir, spec, path, layout.size)
            continue
        render = renders[path]
        if render is None:
            replace_atomically(out_dir / path, lambda tmp: write_pyramid_tiles(
                tmp, layout.size, renderer.render, mpp=MPP, progress=progress, workers=render_workers))
        else:  # the label maps' renderers share state (reuse): one process
            workers = render_workers if path == spec.annotation_path else 1
            replace_atomically(out_dir / path, lambda tmp: write_pyramid_tiles(
                tmp, mask_size, render, mpp=MPP * MASK_DOWNSAMPLE, channels=1,
                progress=progress, workers=workers))
    return layout.size


def write_annotation_geojson(out_dir: Path, spec: SlideSpec, path: str, size: tuple[int, int]) -> Path:
    """The GeoJSON ``path`` of one of the slide's annotation images (read back from its
    written TIFF): the mask as one "Tumor" annotation, a label map as one annotation per
    class (QuPath classification = the class name), unannotated pixels left out."""
    import json

    import tifffile

    from h2g.core.atomic import write_text
    from h2g.io.classes import colour_rgb
    from h2g.io.geojson import class_geojson, tumour_geojson

    image = next(p for p in spec.rasters[1:] if geojson_path(p) == path)
    with tifffile.TiffFile(out_dir / image) as tif:
        values = tif.pages[0].asarray()
    extent = (values.shape[1] * MASK_DOWNSAMPLE, values.shape[0] * MASK_DOWNSAMPLE)
    if image == spec.annotation_path:
        collection = tumour_geojson(values > 127, extent)
    else:
        table = BACH_CLASSES if image == spec.bach_path else LABEL_CLASSES
        index = np.full(256, -1, np.int16)
        for k, (_, value, _) in enumerate(table):
            index[value] = k
        collection = class_geojson(index[values], extent,
                                   [{"name": name, "colour": colour_rgb(colour)} for name, _, colour in table])
    return write_text(out_dir / path, json.dumps(collection, separators=(",", ":")))


def _tile_count(size: tuple[int, int], tile: int = 256) -> int:
    """Tiles in the pyramid :func:`write_slide` writes for a slide of ``size``."""
    width, height = size
    return sum(-(-width // (ds * tile)) * -(-height // (ds * tile))
               for ds in default_downsamples(width, height))


def _output_tiles(size: tuple[int, int], spec: SlideSpec, paths) -> int:
    """Tiles in the pyramids of ``paths`` (outputs of ``spec``, a slide of ``size``)."""
    mask_size = tuple(-(-side // MASK_DOWNSAMPLE) for side in size)
    return sum(_tile_count(size if path == spec.slide_path else mask_size) for path in paths
               if path.endswith(".tiff"))


def _write_text(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        replace_atomically(path, lambda tmp: tmp.write_text(text))


def make_cohort(out_dir, preset: str = "smoke", seed: int = 0, progress: bool = True,
                only_missing: bool = False, workers: int | None = None) -> Path:
    """Write the cohort of ``preset`` (``tiny``, ``smoke`` or ``full``) under ``out_dir``
    from ``seed`` and return its manifest's path.

    Besides the slides, tumour masks and :data:`MANIFEST_NAME`, it writes the
    multi-class label maps, :data:`MULTICLASS_MANIFEST_NAME` and its class table.  With
    ``only_missing``, only the files that do not exist are written (a slide's files are
    the same whichever of them are written).  Slides are written by ``workers`` processes
    (default: up to 2, one per CPU); when there are fewer slides than cores, each slide's
    image is rendered by the cores left over (the ``full`` preset's one slide by all of
    them); the files do not depend on either."""
    out_dir = Path(out_dir)
    todo = {s.slide_id: tuple(p for p in s.outputs
                              if not (only_missing and (out_dir / p).is_file()))
            for s in cohort_specs(preset)}
    specs = [s for s in cohort_specs(preset) if todo[s.slide_id]]
    only = {s.slide_id: todo[s.slide_id] if only_missing else None for s in specs}
    tiles = {s.slide_id: _output_tiles(slide_size(preset, s, seed), s, todo[s.slide_id])
             for s in specs}
    from h2g.core.resources import available_cores

    workers = min(len(specs), workers or min(2, os.cpu_count() or 1))
    render_workers = max(1, available_cores() // max(1, workers))
    with tqdm(total=sum(tiles.values()), unit="tile", desc=f"cohort {preset}",
              disable=not progress) as bar:
        if workers <= 1:
            for spec in specs:
                write_slide(out_dir, preset, spec, seed, progress=bar.update,
                            only=only[spec.slide_id], render_workers=render_workers)
        else:  # spawn: safe even when the caller has TensorFlow's threads running
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                jobs = {pool.submit(write_slide, out_dir, preset, spec, seed,
                                    only=only[spec.slide_id]): spec for spec in specs}
                for job in as_completed(jobs):
                    job.result()
                    bar.update(tiles[jobs[job].slide_id])
    for name, (text, classes) in manifest_texts(preset).items():
        _write_text(out_dir / name, text)
        if classes is not None:
            _write_text(sidecar_path(out_dir / name), classes)
    return out_dir / MANIFEST_NAME
