"""Windows of each region kind on the embedded cohort, found on its region maps.

Slides are never written: every pixel comes from ``SlideRenderer.render`` (a pure function
of position), and everything here is deterministic for a preset and seed.

- Windows of a kind are found on the region map of each slide (``renderer.regions`` on a
  grid of :func:`region_step` level-0 px, :func:`open_slides`).
- Display windows (:func:`find_window`): the first slide, in slide order, with a 20x field
  (:data:`PURITY_WINDOW` level-0 px) inside the slide and at least :data:`PURITY` of the
  kind (the deepest such window: largest share over the 20x, 10x and 5x fields); a kind
  that never reaches it is shown at its best window if that is at least
  :data:`FALLBACK_PURITY` of the kind (``pure`` False), and not found otherwise.
- Statistics windows (:func:`stats_windows`): the best 40x window of each slide that is at
  least :data:`STATS_PURITY` of the kind (up to :data:`STATS_CROPS` slides), measured on
  the pixels of that kind only (:func:`crop_kind_mask`, the region map at 1 um).
- A window whose crop has pen ink (:func:`ink_share` above :data:`MAX_INK`) is skipped
  (:meth:`CropCache.clean`): the region map does not know the slide's artefacts.

TensorFlow-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from h2g.data import cohort

CROP = 256                               # output side of every crop (px)
MAGNIFICATIONS = ((40, 1), (20, 2), (10, 4), (5, 8))  # (objective power, level-0 px per px)
PURITY = 0.8            # share of its kind a display window's 20x field must have ...
FALLBACK_PURITY = 0.3   # ... else its best window is shown if it has at least this share
PURITY_WINDOW = CROP * 2                 # the 20x field, level-0 px
STATS_PURITY = 0.5      # share of its kind a 40x statistics window must have
STATS_CROPS = 6         # statistics windows per kind (one per slide, slides in order)
NOT_TISSUE = "glass"
MAX_INK = 0.01          # a crop with more pen-ink pixels (:func:`ink_share`) is not used


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

