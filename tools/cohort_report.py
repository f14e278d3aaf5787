#!/usr/bin/env python
"""Contact sheet and class statistics of the synthetic cohort against real Camelyon16 patches.

    python tools/cohort_report.py                                  # smoke, seed 0, into docs/cohort
    python tools/cohort_report.py --preset tiny --slides 2 --out /tmp/report
    python tools/cohort_report.py --seed 3 --real-data /data/real --quiet

Writes into ``--out``:

- ``contact_sheet.png``: thumbnails of the first ``--slides`` slides beside their region
  maps (coloured by :data:`h2g.data.cohort.REGION_NAMES`, with a legend); for every region
  kind of the preset, 256 x 256 crops at 40x, 20x, 10x and 5x centred on one point of a
  window of that kind; real Camelyon16 tumour and normal patches beside synthetic 40x
  crops of invasive tumour and of stroma / normal lobule at the same scale.
- ``colour_nuclei.png``: RGB histograms of tissue pixels and nucleus sizes (equivalent
  diameter, um) of synthetic invasive / non-tumour crops against real tumour / normal
  patches, and nucleus densities.
- ``cohort_stats.csv`` / ``cohort_stats.json``: per region kind (and per real class) its
  share of the slides and tissue, mean RGB, nucleus density per 1000 um^2 and nucleus
  diameter median / quartiles.  The JSON adds the crop positions, the group statistics
  of the plots and the method's parameters.

How things are chosen and measured (everything is deterministic for a preset and seed):

- Slides are never written: every pixel comes from ``SlideRenderer.render`` (a pure
  function of position).  A thumbnail is the slide rendered at level 0 in strips and
  box-averaged; above :data:`RENDER_BUDGET` level-0 pixels only a band of rows per
  thumbnail row is rendered.  When the preset's cohort is on disk (``data_manifest.csv``
  in ``--cohort-dir``: the repository for smoke, ``cohort/<preset>`` otherwise) and a
  rendered probe matches its pixels (the files are of this seed), the thumbnail is read
  from the slide's pyramid instead.
- Windows of a kind are found on the region map of each slide (``renderer.regions`` on a
  grid of :func:`region_step` level-0 px): the display crops take, in slide order, the
  first slide with a 20x field (512 level-0 px) inside the slide and at least
  :data:`PURITY` of the kind (the deepest such window: largest share over the 20x, 10x
  and 5x fields); a kind that never reaches it is shown at its best window if that is
  at least :data:`FALLBACK_PURITY` of the kind, labelled with its share, and listed as not
  found otherwise.  Statistics use the best 40x window of each slide that is at least
  :data:`STATS_PURITY` of the kind (up to :data:`STATS_CROPS` slides), measured on the
  pixels of that kind only (the region map at 1 um).  A window whose crop has pen ink
  (:func:`ink_share` above :data:`MAX_INK`) is skipped: the region map does not know the
  slide's artefacts.
- Nuclei (:func:`measure_nuclei`), identical for synthetic and real images: haematoxylin
  optical density by colour deconvolution with the fixed Ruifrok-Johnston H&E(-DAB)
  matrix, Gaussian-smoothed (sigma :data:`SMOOTH_PX` px); threshold: Otsu's on the tissue pixels of the
  image (so that stain strength differences between labs do not decide what a nucleus
  is) but at least :data:`MIN_NUCLEUS_OD` (so that an image with few nuclei does not get
  a threshold inside its stroma); opening with a 3 x 3 cross, holes filled, objects
  under :data:`MIN_NUCLEUS_UM2` dropped; ``scipy.ndimage.label``; equivalent diameter
  ``2 sqrt(area / pi)`` in um of the objects not touching the image border.  Touching
  nuclei are not split, so crowded tumour reads larger than it is, and pale vesicular
  nuclei are partly missed or fragmented, in both alike.

The sheet is a lossless PNG unless that exceeds :data:`MAX_SHEET_BYTES`; then it is saved
with 256 colours (:func:`to_palette`; the statistics never come from the sheet).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm import tqdm

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError, H2GError
from h2g.data import cohort
from h2g.data.stain import BETA, rgb_to_od
from h2g.tiling.tissue import otsu_threshold

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = Path(os.environ.get("H2G_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
REAL_PATCHES = "camelyon16_patches"
REAL_CLASSES = ("tumor", "normal")      # folders under REAL_PATCHES
REAL_MPP = 0.243                         # um/px of the Camelyon16 patches (level 0, 40x)

CROP = 256                               # output side of every crop (px)
MAGNIFICATIONS = ((40, 1), (20, 2), (10, 4), (5, 8))  # (objective power, level-0 px per px)
PURITY = 0.8            # share of its kind a display window's 20x field must have ...
FALLBACK_PURITY = 0.3   # ... else its best window is shown if it has at least this share
PURITY_WINDOW = CROP * 2                 # the 20x field, level-0 px
STATS_PURITY = 0.5      # share of its kind a 40x statistics window must have
STATS_CROPS = 6         # statistics windows per kind (one per slide, slides in order)
SHOW_REAL = 4           # real patches (and synthetic crops) shown per class
TUMOUR_KIND = "invasive"
NON_TUMOUR_KINDS = ("stroma", "normal_lobule")  # the synthetic counterpart of real "normal"
NOT_TISSUE = "glass"

THUMB = 230             # longest side of a slide thumbnail (px)
RENDER_BUDGET = 32_000_000   # level-0 px a thumbnail renders in full; beyond, bands only
BAND_ROWS = 8           # level-0 rows rendered per thumbnail row beyond the budget
STRIP_ROWS = 1024       # about this many level-0 rows per render call in full mode
MAX_INK = 0.01          # a crop with more pen-ink pixels (:func:`ink_share`) is not used
PROBE_TOLERANCE = 12.0  # mean |rendered - on-disk| grey levels for a slide file to be this seed's

# Ruifrok & Johnston (2001) optical density vectors of haematoxylin, eosin and DAB.
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RUIFROK_HED = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)
OD_TO_HED = np.linalg.inv(RUIFROK_HED)
H_FULL_SCALE = 2.5      # haematoxylin OD mapped to 255 for Otsu's histogram
MIN_NUCLEUS_OD = 0.25   # the nucleus threshold never goes below this haematoxylin OD
MIN_NUCLEUS_UM2 = 7.0   # smaller objects (< 3 um across) are specks or chromatin fragments
SMOOTH_PX = 2.0         # Gaussian sigma (px, ~0.5 um) applied to the haematoxylin channel

# Colours of the region kinds; a kind not listed gets one from matplotlib's tab20.
KIND_COLOURS = {
    "glass": (232, 232, 232), "stroma": (240, 150, 200), "inflamed_stroma": (150, 70, 200),
    "fat": (245, 215, 40), "normal_lobule": (0, 160, 80), "invasive": (200, 0, 0),
    "dcis": (255, 130, 0), "adenosis": (0, 190, 235), "lymphoid": (40, 60, 190),
    "sclerosing": (150, 100, 50),
}

MAX_SHEET_BYTES = 5_000_000

GAP = 8                 # px between images
MARGIN = 24             # px around blocks
BLOCK = len(MAGNIFICATIONS) * CROP + (len(MAGNIFICATIONS) - 1) * GAP  # four crops in a row
SHEET_WIDTH = 2 * BLOCK + 3 * MARGIN


# ------------------------------------------------------------------------ slides, windows

@dataclass
class SlideView:
    """One slide of the preset: its spec, layout, renderer and region map on a grid of
    ``step`` level-0 px from the origin (``regions[i, j]`` covers
    ``[j * step, (j + 1) * step) x [i * step, (i + 1) * step)``)."""

    spec: cohort.SlideSpec
    layout: object
    renderer: cohort.SlideRenderer
    step: int
    regions: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.layout.size)


def region_step(size: tuple[int, int], max_cells: int = 4_000_000) -> int:
    """Level-0 px per region-map cell: 32 (8 um), doubled while the map would have more
    than ``max_cells`` cells; at most a 40x crop."""
    step = 32
    while step < CROP and (size[0] // step) * (size[1] // step) > max_cells:
        step *= 2
    return step


def open_slides(preset: str, seed: int) -> list[SlideView]:
    """Every slide of ``preset`` with its region map (cheap: no pixels are rendered)."""
    views = []
    for spec in cohort.cohort_specs(preset):
        layout = cohort.slide_layout(preset, spec, seed)
        renderer = cohort.SlideRenderer(layout, key=(seed, spec.index))
        width, height = layout.size
        step = region_step(layout.size)
        grid = cohort.Grid(0, 0, (height // step, width // step), step)
        views.append(SlideView(spec, layout, renderer, step, renderer.regions(grid)))
    return views


def kind_names() -> tuple[str, ...]:
    """The region kinds the generator knows, in index order."""
    return tuple(cohort.REGION_NAMES)


def kind_colour(name: str) -> tuple[int, int, int]:
    """Display colour of region kind ``name``."""
    if name in KIND_COLOURS:
        return KIND_COLOURS[name]
    from matplotlib import colormaps

    index = kind_names().index(name) if name in kind_names() else zlib.crc32(name.encode())
    rgba = colormaps["tab20"](index % 20)
    return tuple(int(round(255 * c)) for c in rgba[:3])


def window_shares(mask: np.ndarray, cells: int) -> np.ndarray:
    """Share of True cells in the ``cells`` x ``cells`` window centred on each corner of
    the map's grid: ``out[k, l]`` for the corner at row ``k``, column ``l`` (``rows + 1``
    x ``cols + 1`` corners; cells outside the map count as False)."""
    rows, cols = mask.shape
    table = np.zeros((rows + 1, cols + 1), np.float64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    half = cells // 2
    r0 = np.clip(np.arange(rows + 1) - half, 0, rows)
    r1 = np.clip(np.arange(rows + 1) - half + cells, 0, rows)
    c0 = np.clip(np.arange(cols + 1) - half, 0, cols)
    c1 = np.clip(np.arange(cols + 1) - half + cells, 0, cols)
    total = (table[r1][:, c1] - table[r0][:, c1] - table[r1][:, c0] + table[r0][:, c0])
    return total / float(cells * cells)


@dataclass
class Window:
    """A window of region kind ``kind``: centred on level-0 ``(cx, cy)`` of slide
    ``slide`` (position in the list of :class:`SlideView`), ``share`` of its ``size``
    level-0 px field of that kind; ``pure`` when it met the purity asked."""

    kind: str
    slide: int
    cx: int
    cy: int
    size: int
    share: float
    pure: bool = True

    def as_dict(self, views: list[SlideView]) -> dict:
        return {"slide": views[self.slide].spec.slide_id, "cx": self.cx, "cy": self.cy,
                "field_px": self.size, "share": round(self.share, 3), "pure": self.pure}


def best_window(view: SlideView, kind_index: int, size: int,
                context: int) -> tuple[float, int, int] | None:
    """The best window of kind ``kind_index`` in one slide: the largest share of its
    ``size`` level-0 px field (ties: the largest share of the 2x and 4x fields, then the
    first in raster order) among centres whose ``context`` px field lies inside the
    slide.  Returns ``(share, cx, cy)`` or None when the kind is absent or no centre fits."""
    mask = view.regions == kind_index
    if not mask.any():
        return None
    step = view.step
    width, height = view.size
    corners_x = np.arange(mask.shape[1] + 1) * step
    corners_y = np.arange(mask.shape[0] + 1) * step
    half = context // 2
    fits = (((corners_y >= half) & (corners_y <= height - half))[:, None]
            & ((corners_x >= half) & (corners_x <= width - half))[None, :])
    if not fits.any():
        return None
    share = window_shares(mask, max(1, size // step))
    depth = window_shares(mask, max(1, 2 * size // step)) + window_shares(mask, max(1, 4 * size // step))
    score = np.where(fits, np.round(share, 6) * 10 + depth, -np.inf)
    k, l = np.unravel_index(int(np.argmax(score)), score.shape)
    if not np.isfinite(score[k, l]) or share[k, l] <= 0:
        return None
    return float(share[k, l]), int(corners_x[l]), int(corners_y[k])


def find_window(views: list[SlideView], kind: str, size: int = PURITY_WINDOW,
                purity: float = PURITY, fallback: float | None = FALLBACK_PURITY,
                context: int = PURITY_WINDOW, accept=None) -> Window | None:
    """The display window of ``kind``: in the first slide (in order) that has one, the
    best window whose ``size`` px field is at least ``purity`` of the kind and whose
    ``context`` px field lies inside the slide (the wider crops may run past the edge:
    they show glass there).  When no slide has one, the best window of all slides if its
    share is at least ``fallback`` (``pure`` False), else None.  ``accept(window)``, when
    given, can veto a slide's window (e.g. one under a pen mark)."""
    kind_index = kind_names().index(kind)
    best = None
    for position, view in enumerate(views):
        found = best_window(view, kind_index, size, context)
        if found is None:
            continue
        share, cx, cy = found
        window = Window(kind, position, cx, cy, size, share, share >= purity)
        if window.pure:
            if accept is None or accept(window):
                return window
        elif (best is None or share > best.share) and (accept is None or accept(window)):
            best = window
    if best is not None and fallback is not None and best.share >= fallback:
        return best
    return None


def stats_windows(views: list[SlideView], kind: str, count: int = STATS_CROPS,
                  purity: float = STATS_PURITY, accept=None) -> list[Window]:
    """Up to ``count`` 40x windows of ``kind``, the best of each slide in order, each at
    least ``purity`` of the kind (and passing ``accept(window)`` when given)."""
    kind_index = kind_names().index(kind)
    out = []
    for position, view in enumerate(views):
        found = best_window(view, kind_index, CROP, CROP)
        if found is None or found[0] < purity:
            continue
        window = Window(kind, position, found[1], found[2], CROP, found[0])
        if accept is None or accept(window):
            out.append(window)
            if len(out) == count:
                break
    return out


def render_clipped(renderer, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``renderer.render`` of a level-0 region, only the part inside the slide rendered
    (the layout ends a little beyond it) and the rest filled with the glass colour."""
    width, height = renderer.layout.size
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return renderer.render(x, y, w, h)
    out = np.empty((h, w, 3), np.uint8)
    out[:] = np.asarray(getattr(cohort, "BACKGROUND", (245, 245, 247)), np.float64).round().astype(np.uint8)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = renderer.render(x0, y0, x1 - x0, y1 - y0)
    return out


def render_crop(renderer, cx: int, cy: int, downsample: int, size: int = CROP) -> np.ndarray:
    """A ``size`` x ``size`` RGB crop centred on level-0 ``(cx, cy)`` at ``downsample``
    level-0 px per px (area averaging); glass beyond the slide's edge."""
    side = size * downsample
    image = render_clipped(renderer, int(cx - side // 2), int(cy - side // 2), side, side)
    if downsample == 1:
        return image
    return np.asarray(Image.fromarray(image).reduce(downsample))


def crop_kind_mask(renderer, cx: int, cy: int, kind_index: int, size: int = CROP,
                   cell: int = cohort.STRUCTURE) -> np.ndarray:
    """Which pixels of the 40x crop centred on ``(cx, cy)`` are of kind ``kind_index``
    (the region map on a ``cell`` level-0 px grid, repeated to pixels)."""
    n = size // cell
    grid = cohort.Grid(cx - size // 2, cy - size // 2, (n, n), cell)
    regions = renderer.regions(grid) == kind_index
    return np.repeat(np.repeat(regions, cell, axis=0), cell, axis=1)


def kind_area_shares(views: list[SlideView]) -> dict[str, tuple[float, float | None]]:
    """Per kind ``(share of all slide pixels, share of tissue pixels)`` over the region
    maps of every slide (tissue: not glass; glass's tissue share is None)."""
    names = kind_names()
    counts = np.zeros(len(names), np.float64)
    for view in views:
        counts += np.bincount(view.regions.ravel(), minlength=len(names))[:len(names)]
    total = counts.sum()
    tissue = total - (counts[names.index(NOT_TISSUE)] if NOT_TISSUE in names else 0)
    out = {}
    for i, name in enumerate(names):
        out[name] = (counts[i] / total if total else 0.0,
                     None if name == NOT_TISSUE else (counts[i] / tissue if tissue else 0.0))
    return out


# ------------------------------------------------------------------------------ thumbnails

def thumbnail_factor(size: tuple[int, int], longest: int = THUMB) -> int:
    """Level-0 px per thumbnail px so that the longest side is at most ``longest``."""
    return max(1, math.ceil(max(size) / longest))


def thumbnail_shape(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(rows, cols) of the thumbnail of a slide of ``size`` at ``factor``."""
    return -(-size[1] // factor), -(-size[0] // factor)


def thumbnail_units(size: tuple[int, int], factor: int) -> int:
    """Render calls :func:`rendered_thumbnail` makes (for the progress bar)."""
    rows, _ = thumbnail_shape(size, factor)
    if size[0] * size[1] > RENDER_BUDGET:
        return rows
    per_call = max(1, STRIP_ROWS // factor)
    return -(-rows // per_call)


def rendered_thumbnail(renderer, size: tuple[int, int], factor: int, progress=None) -> np.ndarray:
    """The slide's thumbnail from level-0 renders: all of it box-averaged by ``factor``
    when it has at most :data:`RENDER_BUDGET` px, else a band of :data:`BAND_ROWS` rows
    through the middle of each thumbnail row, averaged over its columns."""
    rows, cols = thumbnail_shape(size, factor)
    width = cols * factor
    out = np.empty((rows, cols, 3), np.uint8)
    if size[0] * size[1] <= RENDER_BUDGET:
        per_call = max(1, STRIP_ROWS // factor)
        for first in range(0, rows, per_call):
            count = min(per_call, rows - first)
            strip = render_clipped(renderer, 0, first * factor, width, count * factor)
            out[first:first + count] = np.asarray(Image.fromarray(strip).reduce(factor))
            if progress:
                progress(1)
        return out
    band = min(BAND_ROWS, factor)
    for row in range(rows):
        top = row * factor + (factor - band) // 2
        strip = render_clipped(renderer, 0, top, width, band).astype(np.float32)
        out[row] = np.round(strip.reshape(band, cols, factor, 3).mean(axis=(0, 2))).astype(np.uint8)
        if progress:
            progress(1)
    return out


def region_thumbnail(renderer, size: tuple[int, int], factor: int) -> np.ndarray:
    """The slide's region map at thumbnail resolution, uint8 kind indices."""
    return renderer.regions(cohort.Grid(0, 0, thumbnail_shape(size, factor), factor))


def colour_regions(regions: np.ndarray) -> np.ndarray:
    """RGB image of a region map (:func:`kind_colour` per kind)."""
    palette = np.array([kind_colour(name) for name in kind_names()], np.uint8)
    return palette[np.minimum(regions, len(palette) - 1)]


def cohort_on_disk(preset: str, folder: Path | None) -> Path | None:
    """The folder of the preset's cohort files when its manifest is there and is
    exactly the preset's (:func:`cohort.manifest_text`), else None."""
    if folder is None:
        return None
    manifest = folder / cohort.MANIFEST_NAME
    try:
        return folder if manifest.read_text() == cohort.manifest_text(preset) else None
    except (OSError, UnicodeDecodeError):
        return None


def default_cohort_dir(preset: str) -> Path:
    """Where ``tools/make_cohort.py`` writes a preset's cohort by default."""
    return REPO if preset == "smoke" else REPO / "cohort" / preset


def disk_thumbnail(path: Path, view: SlideView, factor: int) -> np.ndarray | None:
    """The thumbnail read from the slide file's pyramid (the finest level no finer than
    needed, box-resized), or None when the file is unreadable or is not of this seed (a
    rendered 40x probe on tissue differs from the file by more than
    :data:`PROBE_TOLERANCE` grey levels on average)."""
    from h2g.io.slide import Slide

    if not path.is_file():
        return None
    try:
        with Slide(path) as slide:
            if tuple(slide.dimensions) != view.size:
                return None
            probe = best_window(view, kind_names().index(TUMOUR_KIND), CROP, CROP)
            if probe is not None:
                _, cx, cy = probe
                on_disk = slide.read_region((cx - CROP // 2, cy - CROP // 2), (CROP, CROP), 40)
                rendered = view.renderer.render(cx - CROP // 2, cy - CROP // 2, CROP, CROP)
                if np.abs(on_disk.astype(np.float32) - rendered).mean() > PROBE_TOLERANCE:
                    return None
            level = slide.best_level_for(factor)
            image = slide.read_level(level)
    except H2GError:
        return None
    rows, cols = thumbnail_shape(view.size, factor)
    scale = factor / slide.level_downsamples[level]
    height, width = image.shape[:2]  # the thumbnail covers whole factor-px cells, the last partly
    box = (0, 0, min(cols * scale, width), min(rows * scale, height))
    return np.asarray(Image.fromarray(image).resize((cols, rows), Image.BOX, box=box))


# ------------------------------------------------------------------------------- nuclei

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
            "nuclei_per_1000um2": _round(self.density, 2),
            "diameter_median_um": _round(q[1], 2),
            "diameter_q1_um": _round(q[0], 2),
            "diameter_q3_um": _round(q[2], 2),
            "diameter_iqr_um": _round(None if q[0] is None else q[2] - q[0], 2),
            "threshold_od_median": _round(float(np.median(self.thresholds)) if self.thresholds else None, 3),
        }


def _round(value, digits: int):
    return None if value is None else round(float(value), digits)


def nucleus_mask(rgb: np.ndarray, tissue: np.ndarray | None = None,
                 um_per_px: float = cohort.MPP) -> tuple[np.ndarray, float]:
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


# ----------------------------------------------------------------------------- measures

@dataclass
class Sample:
    """Images of one kind or class with what is measured on them: ``images`` (for the
    sheet and histograms), ``areas`` (the pixels measured; None = all), ``um_per_px``."""

    name: str
    source: str
    um_per_px: float
    images: list = field(default_factory=list)
    areas: list = field(default_factory=list)
    windows: list = field(default_factory=list)

    @functools.cached_property
    def nuclei(self) -> Nuclei:
        """Nuclei pooled over the images (each on its own measured area)."""
        total = Nuclei()
        for image, area in zip(self.images, self.areas):
            total = total + measure_nuclei(image, self.um_per_px, area)
        return total

    def mean_rgb(self) -> list | None:
        """Mean RGB over the measured pixels of every image."""
        sums, count = np.zeros(3), 0
        for image, area in zip(self.images, self.areas):
            pixels = image.reshape(-1, 3) if area is None else image[area]
            sums += pixels.astype(np.float64).sum(axis=0)
            count += len(pixels)
        return [round(v, 1) for v in sums / count] if count else None

    def tissue_pixels(self) -> np.ndarray:
        """RGB ``(N, 3)`` of the tissue pixels (within the measured areas)."""
        parts = [image[tissue_mask(image) & (np.ones(image.shape[:2], bool) if area is None else area)]
                 for image, area in zip(self.images, self.areas)]
        return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


def load_real(folder: Path) -> tuple[dict[str, Sample], str | None]:
    """The real Camelyon16 patches per class (RGBA composited on white), and a note when
    the folder or a class is missing.  An unreadable PNG is a ConfigError."""
    root = folder / REAL_PATCHES
    if not folder.exists():
        return {}, f"real data folder {folder} is absent: real comparison omitted"
    if not folder.is_dir():
        raise ConfigError(f"--real-data {folder} is not a folder")
    samples, missing = {}, []
    for name in REAL_CLASSES:
        files = sorted((root / name).glob("*.png"))
        if not files:
            missing.append(str(root / name))
            continue
        sample = Sample(name, "real_camelyon16", REAL_MPP)
        for path in files:
            sample.images.append(read_png(path))
            sample.areas.append(None)
            sample.windows.append(path.name)
        samples[name] = sample
    note = f"no real patches in {', '.join(missing)}" if missing else None
    return samples, note


def read_png(path: Path) -> np.ndarray:
    """An RGB(A) image as RGB uint8, transparency composited on white."""
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the image ({exc})") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def real_shown(sample: Sample, count: int = SHOW_REAL) -> list[np.ndarray]:
    """``count`` evenly spaced patches of a real class (file-name order)."""
    n = len(sample.images)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(count, n))})
    return [sample.images[i] for i in picks]


def sample_row(sample: Sample, share: tuple[float, float | None] | None) -> dict:
    """One row of cohort_stats.csv."""
    rgb = sample.mean_rgb()
    row = {"source": sample.source, "name": sample.name, "crops": len(sample.images),
           "um_per_px": sample.um_per_px,
           "area_share": _round(share[0], 4) if share else None,
           "tissue_share": _round(share[1], 4) if share else None,
           "mean_r": rgb[0] if rgb else None, "mean_g": rgb[1] if rgb else None,
           "mean_b": rgb[2] if rgb else None}
    row.update(sample.nuclei.summary() if sample.images else Nuclei().summary() | {"nuclei": None})
    return row


CSV_COLUMNS = ("source", "name", "crops", "um_per_px", "area_share", "tissue_share",
               "mean_r", "mean_g", "mean_b", "nuclei", "nuclei_per_1000um2",
               "diameter_median_um", "diameter_q1_um", "diameter_q3_um", "diameter_iqr_um",
               "threshold_od_median")


def write_csv(path: Path, rows: list[dict]) -> None:
    """cohort_stats.csv (empty cells for missing values)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})


# ---------------------------------------------------------------------------- drawing

@functools.lru_cache(maxsize=16)
def font(size: int, mono: bool = False):
    """DejaVu Sans (Mono) as shipped with matplotlib at ``size`` px; PIL's default
    otherwise."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans Mono" if mono else "DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def text_image(lines, width: int, size: int = 18, colour=(20, 20, 20), mono: bool = False) -> Image.Image:
    """White strip of ``width`` px with ``lines`` of text."""
    lines = [lines] if isinstance(lines, str) else list(lines)
    height = (size + 6) * len(lines) + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((0, 2 + i * (size + 6)), line, fill=colour, font=font(size, mono))
    return image


def labelled(image: np.ndarray | Image.Image, label: str, size: int = 14) -> Image.Image:
    """An image with a one-line caption above it."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    caption = text_image(label, image.width, size)
    out = Image.new("RGB", (image.width, caption.height + image.height), "white")
    out.paste(caption, (0, 0))
    out.paste(image, (0, caption.height))
    return out


def row_of(images: list[Image.Image], gap: int = GAP) -> Image.Image:
    """Images side by side, tops aligned."""
    width = sum(i.width for i in images) + gap * max(0, len(images) - 1)
    height = max((i.height for i in images), default=1)
    out = Image.new("RGB", (max(1, width), height), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width + gap
    return out


def flow(cells: list[Image.Image], width: int, gap: int = MARGIN) -> Image.Image:
    """Cells left to right, wrapping into rows at ``width`` px."""
    rows, current, used = [], [], 0
    for cell in cells:
        if current and used + gap + cell.width > width:
            rows.append(row_of(current, gap))
            current, used = [], 0
        used += cell.width + (gap if current else 0)
        current.append(cell)
    if current:
        rows.append(row_of(current, gap))
    return column_of(rows, GAP)


def column_of(images: list[Image.Image], gap: int = MARGIN, width: int | None = None) -> Image.Image:
    """Images one below the other, left aligned, on a white sheet."""
    width = width or max((i.width for i in images), default=1)
    height = sum(i.height for i in images) + gap * max(0, len(images) - 1)
    out = Image.new("RGB", (width, max(1, height)), "white")
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height + gap
    return out


def legend(width: int, present: set[str]) -> Image.Image:
    """Colour boxes with the names of every region kind (those absent marked)."""
    cells = []
    for name in kind_names():
        cell = Image.new("RGB", (22 + 10 * len(name) + 90, 24), "white")
        draw = ImageDraw.Draw(cell)
        draw.rectangle((0, 3, 17, 20), fill=kind_colour(name), outline=(90, 90, 90))
        draw.text((24, 2), name + ("" if name in present else " (absent)"), fill=(20, 20, 20), font=font(16))
        cells.append(cell)
    return flow(cells, width, gap=16)


# ------------------------------------------------------------------------------ the report

@dataclass
class Report:
    """Everything the sheet, plots and tables are drawn from."""

    preset: str
    seed: int
    views: list
    shown: list                      # (view, thumbnail, region thumbnail, source)
    crops: dict                      # kind -> (Window, [images per magnification]) or None
    samples: dict                    # kind -> Sample (40x statistics crops)
    real: dict                       # class -> Sample
    real_note: str | None
    shares: dict


class CropCache:
    """Crops of the slides rendered once each (:func:`render_crop`), keyed by slide
    position, centre and downsample; ``progress(1)`` per crop rendered."""

    def __init__(self, views: list[SlideView], progress=None):
        self.views = views
        self.progress = progress
        self.cache = {}

    def get(self, slide: int, cx: int, cy: int, downsample: int) -> np.ndarray:
        key = (slide, cx, cy, downsample)
        if key not in self.cache:
            self.cache[key] = render_crop(self.views[slide].renderer, cx, cy, downsample)
            if self.progress:
                self.progress(1)
        return self.cache[key]

    def clean(self, window: Window, downsample: int) -> bool:
        """Whether the window's crop at ``downsample`` is free of pen ink."""
        return ink_share(self.get(window.slide, window.cx, window.cy, downsample)) <= MAX_INK


def ink_share(rgb: np.ndarray) -> float:
    """Share of pixels that are marker ink rather than H&E: greener than red by more than
    12 (green and blue inks: haematoxylin and eosin both absorb green more than red), or
    dark and grey (black ink)."""
    rgb = rgb.astype(np.int16)
    r, g = rgb[..., 0], rgb[..., 1]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return float(((g > r + 12) | ((high < 80) & (high - low < 30))).mean())


def build_report(preset: str, seed: int, count: int, real_data: Path, cohort_dir: Path | None,
                 progress: bool = True) -> Report:
    """Render the thumbnails, find the windows (vetoing any under pen ink), render the
    crops, load and measure the real patches."""
    views = open_slides(preset, seed)
    shares = kind_area_shares(views)
    present = [k for k in kind_names() if shares[k][0] > 0]
    real, real_note = load_real(real_data)
    shown_views = views[:count]
    disk = cohort_on_disk(preset, cohort_dir)
    factors = [thumbnail_factor(v.size) for v in shown_views]
    estimate = (sum(thumbnail_units(v.size, f) for v, f in zip(shown_views, factors))
                + len(present) * (len(MAGNIFICATIONS) + STATS_CROPS) + sum(len(s.images) for s in real.values()))
    with tqdm(total=estimate, desc=f"report {preset}", unit="render", disable=not progress) as bar:
        shown = []
        for view, factor in zip(shown_views, factors):
            thumb = disk_thumbnail(disk / view.spec.slide_path, view, factor) if disk else None
            source = "slide file"
            if thumb is None:
                thumb, source = rendered_thumbnail(view.renderer, view.size, factor, bar.update), "rendered"
            else:
                bar.update(thumbnail_units(view.size, factor))
            shown.append((view, thumb, region_thumbnail(view.renderer, view.size, factor), source))
        cache = CropCache(views, bar.update)
        crops, samples = {}, {}
        for kind in present:
            window = find_window(views, kind, accept=lambda w: cache.clean(w, 2))
            crops[kind] = None if window is None else (
                window, [cache.get(window.slide, window.cx, window.cy, ds) for _, ds in MAGNIFICATIONS])
            sample = Sample(kind, "synthetic", cohort.MPP)
            kind_index = kind_names().index(kind)
            for w in stats_windows(views, kind, accept=lambda w: cache.clean(w, 1)):
                sample.images.append(cache.get(w.slide, w.cx, w.cy, 1))
                sample.areas.append(crop_kind_mask(views[w.slide].renderer, w.cx, w.cy, kind_index))
                sample.windows.append(w)
            samples[kind] = sample
        for sample in real.values():  # measured now so the bar covers the slow part
            _ = sample.nuclei
            bar.update(len(sample.images))
        bar.total = bar.n
        bar.refresh()
    return Report(preset, seed, views, shown, crops, samples, real, real_note, shares)


def groups(report: Report) -> dict[str, Sample]:
    """The four groups of the plots: synthetic invasive and non-tumour (stroma, normal
    lobule) 40x crops measured whole, real tumour and normal patches."""
    out = {}
    tumour = report.samples.get(TUMOUR_KIND)
    if tumour is not None and tumour.images:
        out["synthetic invasive"] = Sample("synthetic invasive", "synthetic", cohort.MPP,
                                           list(tumour.images), [None] * len(tumour.images))
    normal = Sample("synthetic non-tumour", "synthetic", cohort.MPP)
    for kind in NON_TUMOUR_KINDS:
        if kind in report.samples:
            normal.images += report.samples[kind].images
            normal.areas += [None] * len(report.samples[kind].images)
    if normal.images:
        out["synthetic non-tumour"] = normal
    for name, label in (("tumor", "real tumour"), ("normal", "real normal")):
        if name in report.real:
            out[label] = report.real[name]
    return out


def synthetic_side(report: Report, kinds, count: int = SHOW_REAL) -> list[np.ndarray]:
    """``count`` synthetic 40x crops of ``kinds`` (statistics crops, interleaving kinds)."""
    pools = [report.samples[k].images for k in kinds if k in report.samples and report.samples[k].images]
    out = []
    for i in range(count):
        for pool in pools:
            if len(out) < count and i < len(pool):
                out.append(pool[i])
    return out


def sheet_thumbnails(report: Report) -> Image.Image:
    """Section 1: thumbnails beside region maps, and the legend."""
    cells = []
    for view, thumb, regions, source in report.shown:
        spec = view.spec
        pair = row_of([Image.fromarray(thumb), Image.fromarray(colour_regions(regions))], GAP)
        cells.append(labelled(pair, f"{spec.slide_id}  grade {spec.grade}  {spec.split}  "
                                    f"{view.size[0]}x{view.size[1]} px  ({source})"))
    present = {k for k, (area, _) in report.shares.items() if area > 0}
    title = text_image(f"Slides (first {len(report.shown)} of {len(report.views)}): image | region map",
                       SHEET_WIDTH - 2 * MARGIN, 22)
    return column_of([title, flow(cells, SHEET_WIDTH - 2 * MARGIN), legend(SHEET_WIDTH - 2 * MARGIN, present)], GAP)


def sheet_kinds(report: Report) -> Image.Image:
    """Section 2: per region kind, crops at 40x, 20x, 10x and 5x on one centre."""
    blocks, missing = [], []
    for kind, found in report.crops.items():
        if found is None:
            missing.append(kind)
            continue
        window, images = found
        view = report.views[window.slide]
        share = f"{100 * window.share:.0f}% of the 20x field"
        if not window.pure:
            share += f" (best found; < {100 * PURITY:.0f}%)"
        crops = [labelled(image, f"{power}x  {CROP * ds * cohort.MPP:.0f} um")
                 for image, (power, ds) in zip(images, MAGNIFICATIONS)]
        head = text_image(f"{kind}: {view.spec.slide_id} (grade {view.spec.grade}) at "
                          f"({window.cx}, {window.cy}), {share}", BLOCK, 17, kind_colour_text(kind))
        blocks.append(column_of([head, row_of(crops)], 2))
    parts = [text_image("Region kinds: the same centre at 40x, 20x, 10x, 5x (256 px each, area-averaged)",
                        SHEET_WIDTH - 2 * MARGIN, 22)]
    if missing:
        parts.append(text_image(f"not found (no 20x field >= {100 * FALLBACK_PURITY:.0f}% of the kind "
                                f"in {len(report.views)} slides): {', '.join(missing)}",
                                SHEET_WIDTH - 2 * MARGIN, 17, (170, 0, 0)))
    parts.append(flow(blocks, SHEET_WIDTH - 2 * MARGIN, MARGIN))
    return column_of(parts, GAP)


def kind_colour_text(kind: str) -> tuple[int, int, int]:
    """The kind's colour darkened enough to read as text on white."""
    return tuple(int(c * 0.6) for c in kind_colour(kind))


def sheet_real(report: Report) -> Image.Image:
    """Section 3: real Camelyon16 patches above synthetic 40x crops at the same scale."""
    width = SHEET_WIDTH - 2 * MARGIN
    title = text_image("Real Camelyon16 (40x, 0.243 um/px) vs synthetic (40x, 0.25 um/px): "
                       "64 um fields", width, 22)
    if not report.real:
        return column_of([title, text_image(report.real_note or "no real data", width, 18, (170, 0, 0))], GAP)
    columns = []
    for real_name, label, kinds, synthetic_label in (
            ("tumor", "real tumour (lymph-node metastasis)", (TUMOUR_KIND,), "synthetic invasive"),
            ("normal", "real normal (lymph node)", NON_TUMOUR_KINDS, "synthetic " + " / ".join(NON_TUMOUR_KINDS))):
        rows = []
        if real_name in report.real:
            rows.append(labelled(row_of([Image.fromarray(i) for i in real_shown(report.real[real_name])]), label, 16))
        synthetic = synthetic_side(report, kinds)
        if synthetic:
            rows.append(labelled(row_of([Image.fromarray(i) for i in synthetic]), synthetic_label, 16))
        if rows:
            columns.append(column_of(rows, GAP, BLOCK))
    parts = [title]
    if report.real_note:
        parts.append(text_image(report.real_note, width, 16, (170, 0, 0)))
    parts.append(row_of(columns, MARGIN))
    return column_of(parts, GAP)


def sheet_summary(rows: list[dict]) -> Image.Image:
    """Section 4: a few numbers from cohort_stats.csv."""
    lines = ["Statistics (cohort_stats.csv): mean RGB of measured pixels; nuclei per 1000 um^2 tissue; "
             "nucleus diameter median [IQR] um"]
    for row in rows:
        rgb = "-" if row["mean_r"] is None else f"({row['mean_r']:.0f}, {row['mean_g']:.0f}, {row['mean_b']:.0f})"
        dens = "-" if row["nuclei_per_1000um2"] is None else f"{row['nuclei_per_1000um2']:.1f}"
        diam = ("-" if row["diameter_median_um"] is None else
                f"{row['diameter_median_um']:.1f} [{row['diameter_q1_um']:.1f}-{row['diameter_q3_um']:.1f}]")
        share = "" if row["tissue_share"] is None else f"{100 * row['tissue_share']:.1f}% of tissue"
        lines.append(f"  {row['source']:<16} {row['name']:<16} {share:<15} {row['crops']:>3} crops  RGB {rgb:<16} "
                     f"{dens:>5} nuclei  diameter {diam}")
    return text_image(lines, SHEET_WIDTH - 2 * MARGIN, 15, mono=True)


def contact_sheet(report: Report, rows: list[dict]) -> Image.Image:
    """The whole contact sheet."""
    head = text_image(f"Synthetic cohort '{report.preset}', seed {report.seed}: {len(report.views)} slides, "
                      f"level 0 = 40x ({cohort.MPP} um/px)", SHEET_WIDTH - 2 * MARGIN, 26)
    body = column_of([head, sheet_thumbnails(report), sheet_kinds(report), sheet_real(report),
                      sheet_summary(rows)], MARGIN + 8)
    out = Image.new("RGB", (SHEET_WIDTH, body.height + 2 * MARGIN), "white")
    out.paste(body, (MARGIN, MARGIN))
    return out


def save_sheet(sheet: Image.Image, path: Path, limit: int = MAX_SHEET_BYTES) -> bool:
    """Save the sheet as PNG, as a 256-colour one (:func:`to_palette`) when the lossless
    file would exceed ``limit`` bytes; returns whether it was reduced to a palette."""
    import io

    buffer = io.BytesIO()
    sheet.save(buffer, "PNG")
    reduced = buffer.tell() > limit
    if reduced:
        buffer = io.BytesIO()
        to_palette(sheet).save(buffer, "PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return reduced


def to_palette(sheet: Image.Image, chunk: int = 8192) -> Image.Image:
    """The sheet with 256 colours: the kinds' colours, black and white exactly, the rest
    from a median-cut palette; every colour mapped to its nearest palette entry (no
    dithering, so text and region maps stay crisp)."""
    fixed = list(dict.fromkeys([kind_colour(n) for n in kind_names()] + [(0, 0, 0), (255, 255, 255)]))[:64]
    adaptive = sheet.quantize(256 - len(fixed), method=Image.Quantize.MEDIANCUT).getpalette()
    adaptive = np.asarray(adaptive[:3 * (256 - len(fixed))], np.int32).reshape(-1, 3)
    palette = np.concatenate([np.asarray(fixed, np.int32), adaptive])
    rgb = np.asarray(sheet.convert("RGB")).astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    unique, inverse = np.unique(packed.ravel(), return_inverse=True)
    colours = np.stack([unique >> 16, (unique >> 8) & 255, unique & 255], axis=1)
    nearest = np.empty(len(unique), np.uint8)
    for first in range(0, len(unique), chunk):
        part = colours[first:first + chunk, None, :] - palette[None, :, :]
        nearest[first:first + chunk] = np.einsum("ijk,ijk->ij", part, part).argmin(axis=1)
    out = Image.fromarray(nearest[inverse].reshape(packed.shape), "P")
    out.putpalette(palette.astype(np.uint8).ravel().tolist())
    return out


def plot_colour_nuclei(report: Report, measured: dict[str, Nuclei], path: Path) -> None:
    """colour_nuclei.png: RGB histograms of tissue pixels, nucleus diameter histograms
    and nucleus densities of the four groups (and densities of every synthetic kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"synthetic invasive": ("#c00000", "-"), "real tumour": ("#600000", "--"),
              "synthetic non-tumour": ("#0060c0", "-"), "real normal": ("#002a60", "--")}
    group = groups(report)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), dpi=100)
    bins = np.arange(0, 257, 4)
    for c, (ax, channel) in enumerate(zip(axes[0], ("red", "green", "blue"))):
        for name, sample in group.items():
            pixels = sample.tissue_pixels()
            if len(pixels):
                colour, line = styles[name]
                ax.hist(pixels[:, c], bins=bins, density=True, histtype="step", color=colour,
                        linestyle=line, linewidth=1.6, label=f"{name} ({len(sample.images)})")
        ax.set_title(f"{channel} channel, tissue pixels")
        ax.set_xlabel("value")
        ax.set_xlim(0, 255)
    axes[0][0].legend(fontsize=9)
    dbins = np.arange(0, 20.5, 0.5)
    for ax, names, title in ((axes[1][0], ("synthetic invasive", "real tumour"), "tumour"),
                             (axes[1][1], ("synthetic non-tumour", "real normal"), "non-tumour")):
        for name in names:
            if name in measured and measured[name].diameters.size:
                nuc = measured[name]
                colour, line = styles[name]
                ax.hist(np.clip(nuc.diameters, 0, 20), bins=dbins, density=True, histtype="step",
                        color=colour, linestyle=line, linewidth=1.6,
                        label=f"{name}: median {np.median(nuc.diameters):.1f} um, n={nuc.diameters.size}")
        ax.set_title(f"nucleus equivalent diameter, {title}")
        ax.set_xlabel("um (clipped at 20)")
        ax.legend(fontsize=9)
    ax = axes[1][2]
    labels, values, colours = [], [], []
    for name, nuc in measured.items():
        labels.append(name)
        values.append(nuc.density or 0.0)
        colours.append(styles.get(name, ("#888888", "-"))[0])
    for kind, sample in report.samples.items():
        if sample.images and kind != NOT_TISSUE:
            labels.append(f"kind: {kind}")
            values.append(sample.nuclei.density or 0.0)
            colours.append("#%02x%02x%02x" % kind_colour(kind))
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("nuclei per 1000 um^2 of tissue")
    ax.set_title("nucleus density")
    note = "" if report.real else f" - {report.real_note}"
    fig.suptitle(f"Synthetic '{report.preset}' seed {report.seed} vs real Camelyon16 patches (40x){note}",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- outputs

def stats_rows(report: Report) -> list[dict]:
    """cohort_stats.csv: one row per region kind present in the preset, then per real
    class."""
    rows = []
    for kind in kind_names():
        share = report.shares[kind]
        if share[0] > 0:
            rows.append(sample_row(report.samples[kind], share))
    for name in REAL_CLASSES:
        if name in report.real:
            rows.append(sample_row(report.real[name], None))
    return rows


def stats_json(report: Report, rows: list[dict], measured: dict[str, Nuclei], real_data: Path) -> dict:
    """cohort_stats.json: the rows plus slides, windows, group statistics and method."""
    windows = {}
    for kind, found in report.crops.items():
        windows[kind] = {"display": None if found is None else found[0].as_dict(report.views),
                         "stats": [w.as_dict(report.views) for w in report.samples[kind].windows]}
    group_stats = {}
    for name, sample in groups(report).items():
        rgb = sample.tissue_pixels()
        group_stats[name] = {"images": len(sample.images), "um_per_px": sample.um_per_px,
                             "tissue_mean_rgb": [round(float(v), 1) for v in rgb.mean(axis=0)] if len(rgb) else None,
                             "tissue_std_rgb": [round(float(v), 1) for v in rgb.std(axis=0)] if len(rgb) else None,
                             **measured[name].summary()}
    return {
        "preset": report.preset, "seed": report.seed,
        "slides": [{"slide_id": v.spec.slide_id, "grade": v.spec.grade, "split": v.spec.split,
                    "size": list(v.size), "region_step_px": v.step} for v in report.views],
        "shown": [{"slide_id": v.spec.slide_id, "thumbnail": source} for v, _, _, source in report.shown],
        "region_names": list(kind_names()),
        "real_data": str(real_data), "real_data_used": bool(report.real), "real_note": report.real_note,
        "rows": rows, "windows": windows, "groups": group_stats,
        "not_found": [k for k, found in report.crops.items() if found is None],
        "method": {
            "crop_px": CROP, "magnifications": [{"power": p, "downsample": d} for p, d in MAGNIFICATIONS],
            "purity": PURITY, "fallback_purity": FALLBACK_PURITY, "purity_field_px": PURITY_WINDOW,
            "stats_purity": STATS_PURITY, "stats_crops_per_kind": STATS_CROPS,
            "stain_matrix": "Ruifrok-Johnston H, E, DAB (rows normalised)",
            "threshold": f"max(Otsu on tissue pixels of smoothed H OD (0..{H_FULL_SCALE} -> 0..255), "
                         f"{MIN_NUCLEUS_OD})",
            "smooth_sigma_px": SMOOTH_PX, "min_nucleus_um2": MIN_NUCLEUS_UM2,
            "tissue": f"optical density norm >= {BETA}", "real_um_per_px": REAL_MPP,
            "synthetic_um_per_px": cohort.MPP,
            "non_tumour_kinds": [k for k in NON_TUMOUR_KINDS if k in kind_names()],
        },
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(parser)
    parser.add_argument("--preset", default="smoke", help=f"cohort preset: {', '.join(cohort.PRESETS)} (default smoke)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "cohort",
                        help="output folder (default docs/cohort)")
    parser.add_argument("--real-data", type=Path, default=DEFAULT_REAL_DATA,
                        help="real data folder with camelyon16_patches/{tumor,normal}/*.png "
                             "(default $H2G_REAL_DATA or ../shared/data/real); absent: omitted")
    parser.add_argument("--slides", type=int, default=6, help="slides shown as thumbnails (default 6)")
    parser.add_argument("--cohort-dir", type=Path, default=None,
                        help="folder of the preset's data_manifest.csv, to read thumbnails from its "
                             "slide files (default: where tools/make_cohort.py writes it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def check_args(args) -> None:
    """ConfigError (one line) for a bad option."""
    cohort.get_preset(args.preset)  # names the presets when unknown
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.slides < 1:
        raise ConfigError(f"--slides must be >= 1, got {args.slides}")
    if args.real_data.exists() and not args.real_data.is_dir():
        raise ConfigError(f"--real-data {args.real_data} is not a folder")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot create the folder ({exc.strerror})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    start = time.perf_counter()
    cohort_dir = args.cohort_dir if args.cohort_dir is not None else default_cohort_dir(args.preset)
    report = build_report(args.preset, args.seed, args.slides, args.real_data, cohort_dir,
                          progress=not args.quiet)
    rows = stats_rows(report)
    measured = {name: sample.nuclei for name, sample in groups(report).items()}
    out = args.out
    sheet = contact_sheet(report, rows)
    paths = {"contact_sheet": out / "contact_sheet.png", "colour_nuclei": out / "colour_nuclei.png",
             "csv": out / "cohort_stats.csv", "json": out / "cohort_stats.json"}
    if save_sheet(sheet, paths["contact_sheet"]):
        print(f"contact sheet saved with a 256-colour palette (lossless > {MAX_SHEET_BYTES / 1e6:.0f} MB)")
    plot_colour_nuclei(report, measured, paths["colour_nuclei"])
    write_csv(paths["csv"], rows)
    paths["json"].write_text(json.dumps(stats_json(report, rows, measured, args.real_data), indent=1) + "\n")
    if report.real_note:
        print(report.real_note)
    print(f"contact sheet {sheet.width}x{sheet.height} px")
    for path in paths.values():
        print(f"wrote {path}")
    print(f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
