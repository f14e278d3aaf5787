"""m-UNet's configuration section ``munet`` (the paper's values are the defaults)."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class MUNetConfig:
    """m-UNet (multi-class multi-stain U-Net): two co-centred ``size`` px views at
    ``magnifications`` (high, low; the paper's levels 1 and 3 of a 40x scan, a ratio of
    4), the target the label maps of both; the base U-Net (``base_encoder``) on the
    partial labels, then one master round per entry of ``thresholds`` (m-UNet,
    ``master_encoder``) on the previous model's pseudo-labels (Table 8)."""

    size: int = 512
    magnifications: tuple[float, ...] = (10.0, 2.5)
    base_encoder: str = "b0"
    master_encoder: str = "b4"
    weights: str | None = None  # "imagenet" only when Keras has the file cached
    decoder_width: float = 1.0
    merge_filters: tuple[int, ...] = (256, 64)
    final_filters: int = 16
    bn_momentum: float | None = None  # None: Keras' 0.99; short runs need faster moving statistics
    class_balance: tuple[float, ...] = (2.0, 1.0, 1.0)  # sampler's class stage: tumour, normal, other
    branch_weights: tuple[float, ...] = (1.0, 0.5, 0.5)  # final, high, low outputs
    min_labelled: float = 0.01
    tissue_threshold: float = 0.05
    batch_size: int = 16
    train_batches: int = 500  # per epoch
    val_batches: int = 50
    base_epochs: int = 20
    base_learning_rate: float = 0.01
    base_augment: str = "basic"
    thresholds: tuple[float, ...] = (0.8, 0.7, 0.6, 0.5, 0.4)
    keep_annotations: bool = True  # pseudo-label maps keep the manual labels where there are some
    learning_rates: tuple[float, ...] = (0.005, 0.001, 0.0007, 0.0005, 0.0001)
    epochs: tuple[int, ...] = (5, 5, 5, 5, 10)
    dynamic_weights: tuple[bool, ...] = (True, True, True, True, False)
    # augmentation per round ("+"-joined from basic, colour, noise, heavy, hsv, jitter);
    # the paper's GAN augmentation (rounds 4-5) is left out
    augment: tuple[str, ...] = ("basic+colour+noise", "basic+heavy+noise", "basic+heavy+noise+hsv",
                                "basic+heavy+noise+hsv", "basic+noise+jitter")
    train_stains: tuple[str, ...] = ("er", "pr", "ki67", "her2")  # the stains trained on (IHC)
    stride: int = 512  # inference: high-view px between windows
    inference_batch: int = 4
    pr_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    auc_pixels: int = 200_000  # pixels sampled per class for the AUC


SECTIONS = {"munet": MUNetConfig}


def smoke() -> dict:
    # m-UNet with tiny EfficientNets on 128 px views, two short master rounds
    return {"munet": MUNetConfig(
        size=128, base_encoder="w0.25d0.1", master_encoder="w0.35d0.2", decoder_width=0.125,
        merge_filters=(32, 16), final_filters=8, bn_momentum=0.9, batch_size=8, train_batches=25,
        val_batches=3, base_epochs=8, base_learning_rate=2e-3, thresholds=(0.8, 0.6), learning_rates=(1e-3, 5e-4),
        epochs=(3, 3), dynamic_weights=(True, False),
        augment=("basic+colour+noise", "basic+heavy+noise+hsv+jitter"), stride=128,
        inference_batch=32, auc_pixels=50_000)}


PRESETS = {"smoke": smoke}
