"""H2G-Net's ablation designs (Section 3.2 of the paper): one entry per design, saying
which stages it needs, which models and which loss.  :mod:`h2g.systems.h2g.pipeline` runs
them; :mod:`h2g.systems.registry` lists them beside the other systems' designs.
"""
from __future__ import annotations

from dataclasses import dataclass

from h2g.core.choices import Choice


class Kind(Choice):
    """How a design predicts: Otsu's tissue threshold, a network on the low-resolution
    image alone, a patch heatmap, or a heatmap refined with the low-resolution image."""

    OTSU = "otsu"
    LOWRES = "lowres"
    PATCHWISE = "patchwise"
    REFINED = "refined"


@dataclass(frozen=True)
class Design:
    name: str  # command-line name
    label: str  # the paper's name
    numeral: str  # the paper's roman numeral
    kind: Kind
    classifier: str | None = None  # h2g.models name of the patch classifier
    cluster_guided: bool = False  # CWCE loss with the frozen k-means cluster model
    refiner: str | None = None  # h2g.models name of the refinement / low-resolution net
    system: str = "h2g"

    @property
    def deep_learning(self) -> bool:
        return self.kind != Kind.OTSU

    @property
    def needs_heatmaps(self) -> bool:
        return self.classifier is not None


_DESIGNS = (
    Design("otsu", "Otsu", "I", Kind.OTSU),
    Design("unet_lr", "UNet-LR", "II", Kind.LOWRES, refiner="unet_lr"),
    Design("inc_pw", "Inc-PW", "III", Kind.PATCHWISE, classifier="inceptionv3"),
    Design("mob_pw", "Mob-PW", "IV", Kind.PATCHWISE, classifier="mobilenetv2"),
    Design("mob_km_pw", "Mob-KM-PW", "V", Kind.PATCHWISE, classifier="mobilenetv2", cluster_guided=True),
    Design("mob_pw_unet", "Mob-PW-UNet", "VI", Kind.REFINED, classifier="mobilenetv2", refiner="unet"),
    Design("mob_pw_agunet", "Mob-PW-AGUNet", "VII", Kind.REFINED, classifier="mobilenetv2", refiner="agunet"),
    Design("mob_pw_dagunet", "Mob-PW-DAGUNet", "VIII", Kind.REFINED, classifier="mobilenetv2", refiner="dagunet"),
    Design("mob_pw_doubleunet", "Mob-PW-DoubleUNet", "IX", Kind.REFINED, classifier="mobilenetv2", refiner="doubleunet"),
)

DESIGNS: dict[str, Design] = {d.name: d for d in _DESIGNS}

