"""Views: named, co-centred crops of a slide at given magnifications.

Every system's sample is a dict of views plus a target.  H2G-Net's is one 256 px view at
10x; DMMN's three 256 px views at 20x, 10x and 5x; m-UNet's two 512 px views from two
pyramid levels; RAZN's a region and the same region at twice the resolution.  They all
come from :func:`read_views`, for training and for inference alike.

A :class:`View` is ``(name, magnification, size)``: ``size`` output pixels a side at
``magnification``, centred on a level-0 point.  The output pixel grid of a view centred
on ``(cx, cy)`` with downsample ``d`` (level-0 px per output px) starts at level-0
``(cx - size * d / 2, cy - size * d / 2)``, so the centres of all views of one sample
coincide exactly, whatever their magnifications.  Pixels beyond the slide's level-0
extent are ``padding``: ``"reflect"`` (the default: mirrored slide content, so a model
sees plausible context at the slide's border) or ``"white"`` (glass, what OpenSlide
returns outside the slide; H2G-Net's patch view keeps it so its patches are unchanged).

TensorFlow-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from h2g.core.errors import ConfigError, SlideError

PADDINGS = ("reflect", "white")


@dataclass(frozen=True)
class View:
    """``size`` x ``size`` output pixels at ``magnification``, centred on the sample's
    centre; ``padding`` fills what lies beyond the slide."""

    name: str
    magnification: float
    size: int
    padding: str = "reflect"

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"a view needs a name, got {self.name!r}")
        if not (self.magnification > 0) or int(self.size) < 1:
            raise ConfigError(f"view {self.name!r}: magnification and size must be positive, "
                              f"got {self.magnification} and {self.size}")
        if self.padding not in PADDINGS:
            raise ConfigError(f"view {self.name!r}: padding {self.padding!r} is not one of {', '.join(PADDINGS)}")

    def extent(self, slide) -> float:
        """Level-0 pixels the view spans a side on ``slide``."""
        return self.size * slide.downsample_for(self.magnification)

    def top_left(self, slide, centre: tuple[float, float]) -> tuple[float, float]:
        """Level-0 top-left corner of the view's pixel grid around ``centre``."""
        half = self.extent(slide) / 2
        return centre[0] - half, centre[1] - half

    def to_dict(self) -> dict:
        return {"name": self.name, "magnification": float(self.magnification), "size": int(self.size),
                "padding": self.padding}

    @classmethod
    def from_dict(cls, d: Mapping) -> "View":
        return cls(str(d["name"]), float(d["magnification"]), int(d["size"]), str(d.get("padding", "reflect")))


def _inside(start: float, step: float, size: int, limit: int) -> tuple[int, int]:
    """Output pixels ``[lo, hi)`` of a row of ``size`` pixels starting at level-0
    ``start`` with ``step`` level-0 px each whose centres lie inside ``[0, limit)``."""
    lo = math.ceil((0 - start) / step - 0.5)
    hi = math.ceil((limit - start) / step - 0.5)
    return min(max(lo, 0), size), min(max(hi, 0), size)


def read_view(slide, centre: tuple[float, float], view: View) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB of ``view`` around level-0 ``centre`` on ``slide``
    (an :class:`h2g.io.slide.Slide`).  A view that lies entirely outside the slide is a
    :class:`~h2g.core.errors.SlideError`."""
    d = slide.downsample_for(view.magnification)
    x0, y0 = view.top_left(slide, centre)
    size = int(view.size)
    if view.padding == "white":
        return slide.read_region((int(round(x0)), int(round(y0))), (size, size), view.magnification)
    width, height = slide.dimensions
    cols = _inside(x0, d, size, width)
    rows = _inside(y0, d, size, height)
    if cols[0] >= cols[1] or rows[0] >= rows[1]:
        raise SlideError(slide.path, f"view {view.name!r} centred at ({centre[0]:g}, {centre[1]:g}) lies "
                                     f"outside the slide ({width}x{height})")
    inner = slide.read_region(
        (int(round(x0 + cols[0] * d)), int(round(y0 + rows[0] * d))),
        (cols[1] - cols[0], rows[1] - rows[0]), view.magnification)
    if inner.shape[:2] == (size, size):
        return inner
    pad = ((rows[0], size - rows[1]), (cols[0], size - cols[1]), (0, 0))
    return np.pad(inner, pad, mode="reflect" if min(inner.shape[:2]) > 1 else "edge")


def read_views(slide, centre: tuple[float, float], views: Sequence[View]) -> dict[str, np.ndarray]:
    """``{view.name: read_view(...)}`` for every view, all around the same ``centre``."""
    return {v.name: read_view(slide, centre, v) for v in views}


def check_views(views: Sequence[View]) -> tuple[View, ...]:
    """The views as a tuple; :class:`ConfigError` when there are none or names repeat."""
    views = tuple(views)
    if not views:
        raise ConfigError("a sample needs at least one view")
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ConfigError(f"view names must be unique, got {names}")
    return views
