"""RAZN's Table 1 rows (Dong et al.): Scale 1, Scale 2, MS, Attention and RAZN, one
design each.  ``unit`` names the baseline's per-region model
(:func:`h2g.models.razn.unit_model`); RAZN's is None (policy + coarse + fine networks)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Design:
    name: str  # command-line name
    label: str  # the paper's row name
    unit: str | None  # h2g.models.razn unit, None for RAZN itself
    views: tuple[str, ...]  # the views it reads per region: x0 (coarse), x1 (zoomed)
    losses: tuple[str, ...] = ("segmentation",)  # unit outputs whose losses are summed in training
    system: str = "razn"
    deep_learning: bool = True


_DESIGNS = (
    Design("razn_scale1", "Scale 1", "scale1", ("x0",)),
    Design("razn_scale2", "Scale 2", "scale2", ("x1",)),
    Design("razn_ms", "MS", "ms", ("x0", "x1"), losses=("enlarge", "stitch")),
    Design("razn_attention", "Attention", "attention", ("x0", "x1"), losses=("segmentation", "enlarge", "stitch")),
    Design("razn", "RAZN", None, ("x0", "x1")),
)

DESIGNS: dict[str, Design] = {d.name: d for d in _DESIGNS}
