"""DMMN's four architectures (Ho et al., Fig. 4): one design each.  The models are
:mod:`h2g.models.dmmn`; :mod:`h2g.systems.dmmn.pipeline` trains and evaluates them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Design:
    name: str  # command-line name
    label: str  # the paper's name
    architecture: str  # h2g.models name
    views: tuple[str, ...]  # the views the model reads, highest magnification first
    system: str = "dmmn"
    deep_learning: bool = True


_DESIGNS = (
    Design("dsmn_s2", "DSMN-S2", "dsmn_s2", ("x20",)),
    Design("dmmn_ms", "DMMN-MS", "dmmn_ms", ("x20", "x10", "x5")),
    Design("dmmn_m2s", "DMMN-M2S", "dmmn_m2s", ("x20", "x10", "x5")),
    Design("dmmn_m3", "DMMN-M3", "dmmn_m3", ("x20", "x10", "x5")),
)

DESIGNS: dict[str, Design] = {d.name: d for d in _DESIGNS}
