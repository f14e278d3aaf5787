"""RAZN's configuration section ``razn`` (the paper's values are the defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from h2g.core.errors import ConfigError


@dataclass(frozen=True)
class RAZNConfig:
    """RAZN (Dong et al.): regions of ``size`` px at ``magnification`` (``x0``), zoomed
    x2 (``x1``: 2 ``size`` px at twice the magnification, cut into four ``size`` px
    patches); dilated ResNet18 FCNs of ``width``; policy with the bounded Bernoulli
    ``alpha``; Adam at ``learning_rate`` decayed x ``decay_rate`` every ``decay_steps``
    steps (the paper: 0.01, x0.1 every 50000 of 200000 batches); every design trained the
    same way for ``steps`` batches, checkpointed every ``checkpoint_every``."""

    size: int = 256
    magnification: float = 20.0  # x0; x1 is read at twice this (40x: the scanners' full resolution)
    width: float = 1.0  # filter multiplier of ResNet18's 64-128-256-512
    alpha: float = 0.8
    # the reward's denominator J0 is floored here (nats): a region the coarse net already
    # gets nearly right (J0 -> 0, e.g. all glass) would otherwise give a reward of -1e3
    # and swamp the batch's policy gradient (seen in smoke runs); not in the paper
    reward_floor: float = 0.05
    # which regions each segmentation net is trained on: Algorithm 1's (the paper) is only
    # those its drawn action sent to it ("unzoomed" / "zoomed"); "all" is every region
    # (then the coarse net is Scale 1's network and the fine one Scale 2's)
    coarse_regions: str = "unzoomed"
    fine_regions: str = "zoomed"
    # the reward's J0, J1 from the training pass (batch statistics; the paper does not say)
    # or from the networks as inference runs them ("inference": batch norm's moving
    # statistics, one more forward pass of each network per step)
    reward_mode: str = "training"
    attention_width: int = 512  # hidden filters of the Attention baseline's scale-attention head
    min_labelled: float = 0.01
    tissue_threshold: float = 0.05
    batch_size: int = 8
    steps: int = 200_000
    learning_rate: float = 0.01
    decay_steps: int = 50_000
    decay_rate: float = 0.1
    checkpoint_every: int = 1000
    zoom_threshold: float = 0.5  # inference: zoom when p > this (the more likely action)
    timing_regions: int = 100  # regions timed for the relative inference time (the paper: 100)
    inference_batch: int = 8

    def __post_init__(self):
        choices = {"coarse_regions": ("unzoomed", "all"), "fine_regions": ("zoomed", "all"),
                   "reward_mode": ("training", "inference")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"razn.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


SECTIONS = {"razn": RAZNConfig}


def smoke() -> dict:
    # RAZN at 1/8 width on 64 px regions at 5x (x1: 128 px at 10x), 300 steps; lr 1e-3
    # as DMMN's smoke (the paper's 0.01 was not tried at this width).  Two departures
    # from Algorithm 1 (README, RAZN: "Why RAZN fell below Scale 1", with the numbers):
    # both segmentation nets trained on every region (the coarse one is then Scale 1's
    # network), and the reward's losses taken as inference runs the nets
    return {"razn": RAZNConfig(size=64, magnification=5.0, width=0.125, attention_width=8, batch_size=8, steps=300,
                               learning_rate=1e-3, decay_steps=200, checkpoint_every=50, timing_regions=50,
                               coarse_regions="all", fine_regions="all", reward_mode="inference")}


PRESETS = {"smoke": smoke}
