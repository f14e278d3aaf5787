"""How a synthetic slide was stained and scanned: its stain colours, section thickness,
out-of-focus patches, tissue folds and pen marks.

:func:`draw_look` draws a slide's :class:`SlideLook` from the slide's random stream (after
its layout); the renderer applies it.  Everything is a pure function of the level-0
position, so tiles rendered apart still agree.  A look without artefacts
(:func:`plain_look`) is the cohort's original appearance: one stain colour for every
slide and a +-10 % thickness field.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from h2g.data.fields import Grid, smoothstep, um

BACKGROUND = np.array([245.0, 245.0, 247.0])   # glass
HAEMATOXYLIN = np.array([0.55, 0.78, 0.30])     # optical density per unit stain
EOSIN = np.array([0.10, 0.85, 0.36])
MAX_OD = (2.1, 1.3)                              # OD of stain amount 1 (H, E)

INKS = {"green": (20.0, 110.0, 60.0), "blue": (30.0, 60.0, 150.0), "black": (35.0, 35.0, 40.0)}
FOLD_GAIN = 1.75  # a fold doubles the section: stain amounts grow by this factor


@dataclass(frozen=True)
class SlideLook:
    """A slide's staining and scanning.

    ``haematoxylin`` / ``eosin``: optical density per unit stain (RGB), ``max_od`` the OD
    of stain amount 1, ``background`` the glass colour; ``thickness`` the amplitude of the
    section-thickness field (stain x 1 +- thickness over ~400 um); ``blur``: discs
    ``(cx, cy, radius)`` (level-0 px) out of focus with a Gaussian of ``blur_sigma`` px;
    ``fold``: ``(x, y, angle, width)`` of a band where the section lies folded over itself;
    ``pen``: ``(cx, cy, radius, width, ink)`` of a marker circle drawn on the glass."""

    haematoxylin: tuple[float, float, float] = tuple(HAEMATOXYLIN)
    eosin: tuple[float, float, float] = tuple(EOSIN)
    max_od: tuple[float, float] = MAX_OD
    background: tuple[float, float, float] = tuple(BACKGROUND)
    thickness: float = 0.1
    blur: tuple[tuple[float, float, float], ...] = ()
    blur_sigma: float = 0.0
    fold: tuple[float, float, float, float] | None = None
    pen: tuple[float, float, float, float, str] | None = None

    def lut(self) -> np.ndarray:
        """RGB (65536, 3) uint8 of each ``haematoxylin << 8 | eosin`` pair of 0..255 stain
        amounts, by Beer-Lambert absorption of the two stains over the glass colour."""
        amount = np.arange(256) / 255.0
        hv = np.asarray(self.haematoxylin) / np.linalg.norm(self.haematoxylin) * self.max_od[0]
        ev = np.asarray(self.eosin) / np.linalg.norm(self.eosin) * self.max_od[1]
        od = amount[:, None, None] * hv + amount[None, :, None] * ev
        return np.round(np.asarray(self.background) * np.exp(-od)).astype(np.uint8).reshape(-1, 3)

    # -- fields over a level-0 region (None where the artefact does not reach it)
    def blur_weight(self, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """How out of focus each pixel is (0..1)."""
        if not self.blur:
            return None
        xs = np.arange(x, x + w, dtype=np.float32)[None, :] + 0.5
        ys = np.arange(y, y + h, dtype=np.float32)[:, None] + 0.5
        weight = None
        for cx, cy, radius in self.blur:
            if (max(abs(cx - np.clip(cx, x, x + w)), 0) ** 2 + max(abs(cy - np.clip(cy, y, y + h)), 0) ** 2
                    > radius ** 2):
                continue
            disc = smoothstep(radius, 0.6 * radius, np.hypot(xs - cx, ys - cy))
            weight = disc if weight is None else np.maximum(weight, disc)
        return weight

    def fold_weight(self, grid: Grid, wobble=None) -> np.ndarray | None:
        """1 inside the folded band, 0 outside (soft over ~4 um), on ``grid``, or ``None``
        where the band does not reach it; ``wobble(grid)`` bends the band's edges (level-0 px)."""
        if self.fold is None:
            return None
        fx, fy, angle, width = self.fold
        xs, ys = grid.centres()
        d = (xs - fx) * np.sin(angle) - (ys - fy) * np.cos(angle)
        reach = width / 2 + um(20)  # the band, its soft edge and the wobble's amplitude
        if np.abs(d).min() > reach:
            return None
        if wobble is not None:
            d = d + wobble(grid)
        return smoothstep(width / 2 + um(2), width / 2 - um(2), np.abs(d))

    def pen_alpha(self, x: int, y: int, w: int, h: int, gaps) -> np.ndarray | None:
        """Ink opacity of the pen stroke over a level-0 region, or ``None`` where the
        stroke does not reach it; ``gaps()``: smooth noise 0..1 over the region (where
        the marker ran dry)."""
        if self.pen is None:
            return None
        cx, cy, radius, width, _ = self.pen
        near = np.hypot(cx - np.clip(cx, x, x + w), cy - np.clip(cy, y, y + h))
        far = max(np.hypot(cx - px, cy - py) for px in (x, x + w) for py in (y, y + h))
        if near > radius + width or far < radius - width:
            return None
        xs = np.arange(x, x + w, dtype=np.float32)[None, :] + 0.5
        ys = np.arange(y, y + h, dtype=np.float32)[:, None] + 0.5
        off = np.abs(np.hypot(xs - cx, ys - cy) - radius)
        stroke = smoothstep(width / 2, width / 2 - um(6), off)
        return stroke * (0.55 + 0.35 * smoothstep(0.25, 0.6, gaps()))

    def ink(self) -> np.ndarray:
        return np.asarray(INKS[self.pen[4]], np.float32)


def plain_look() -> SlideLook:
    """The cohort's original look: the same stains on every slide, no artefacts."""
    return SlideLook()


def draw_look(rng: np.random.Generator, size: tuple[int, int], tissue_cells: np.ndarray,
              tumour_cells: np.ndarray) -> SlideLook:
    """A random look for one slide: stain vectors and strengths, glass colour and section
    thickness vary from slide to slide; 40 % of slides have out-of-focus patches, 30 % a
    fold through the tissue, 30 % a pen circle round part of the tumour.  ``tissue_cells`` /
    ``tumour_cells``: level-0 (x, y) of the layout cells inside the tissue / tumour."""
    width, height = size
    longest = max(size)

    def jitter(vector, sd):
        v = np.clip(np.asarray(vector) + rng.normal(0, sd, 3), 0.05, None)
        return tuple(float(c) for c in v)

    look = dict(
        haematoxylin=jitter(HAEMATOXYLIN, 0.05), eosin=jitter(EOSIN, 0.04),
        max_od=(float(MAX_OD[0] * rng.uniform(0.8, 1.2)), float(MAX_OD[1] * rng.uniform(0.75, 1.25))),
        background=tuple(float(c) for c in np.clip(BACKGROUND + rng.normal(0, 2.5, 3), 232, 252)),
        thickness=float(rng.uniform(0.1, 0.3)),
    )
    if rng.random() < 0.4:
        count = int(rng.integers(1, 3))
        look["blur"] = tuple((float(rng.uniform(0, width)), float(rng.uniform(0, height)),
                              float(rng.uniform(0.1, 0.25) * longest)) for _ in range(count))
        look["blur_sigma"] = float(rng.uniform(1.5, 3.5))
    if rng.random() < 0.3 and len(tissue_cells):
        fx, fy = tissue_cells[rng.integers(len(tissue_cells))]
        look["fold"] = (float(fx), float(fy), float(rng.uniform(0, np.pi)), float(um(rng.uniform(40, 120))))
    if rng.random() < 0.3 and len(tumour_cells):
        cx, cy = tumour_cells[rng.integers(len(tumour_cells))]
        ink = str(rng.choice(sorted(INKS)))
        look["pen"] = (float(cx), float(cy), float(um(rng.uniform(400, 900))),
                       float(um(rng.uniform(120, 250))), ink)
    return SlideLook(**look)


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """``rgb`` (h, w, 3) blurred in the plane (float32)."""
    return ndimage.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0), truncate=3.0)
