"""m-UNet's two designs (multiclass-multistain-unet.txt, Table 8): the base U-Net-B0
alone, and the master m-UNet-B4 after the pseudo-label rounds."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Design:
    name: str  # command-line name
    label: str  # the paper's name
    rounds: bool  # False: the base model; True: base + every master round
    system: str = "munet"
    deep_learning: bool = True


_DESIGNS = (
    Design("unet_b0", "U-Net-B0", rounds=False),
    Design("munet_b4", "m-UNet-B4", rounds=True),
)

DESIGNS: dict[str, Design] = {d.name: d for d in _DESIGNS}
