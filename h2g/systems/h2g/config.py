"""H2G-Net's configuration sections (the paper's values are the defaults; the ``smoke``
preset's are :func:`smoke`): ``classifier``, ``cluster``, ``heatmap`` and ``refine``."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class ClassifierConfig:
    """Patch-classifier training (Section 3.4)."""

    alpha: float = 1.0  # MobileNetV2 width multiplier
    inception_width: float = 1.0  # InceptionV3 width (1.0 = keras.applications' model)
    weights: str | None = "imagenet"  # the paper fine-tunes ImageNet backbones
    batch_size: int = 64
    train_batches: int = 500
    val_batches: int = 200
    epochs: int = 100
    learning_rate: float = 1e-4
    accumulation_steps: int = 1
    patience: int | None = None
    augment: bool = True
    # BatchNorm momentum of the backbone; None keeps keras.applications' 0.999, right for
    # fine-tuning ImageNet weights over 50k steps.  A backbone trained from scratch for a
    # few hundred steps needs a faster one, or its inference-mode statistics stay at their
    # initial values and every patch gets the same prediction.
    bn_momentum: float | None = None

@dataclass(frozen=True)
class ClusterConfig:
    """k-means cluster guiding (Section 2.3): VGG16 -> z-score -> PCA 95 % -> k-means."""

    n_batches: int = 100
    batch_size: int = 32
    n_clusters: int = 10
    variance: float = 0.95
    weights: str | None = "imagenet"
    feature_size: int = 256  # patches are resized to this before VGG16

@dataclass(frozen=True)
class HeatmapConfig:
    batch_size: int = 64
    readers: int = 4
    # px at the patch magnification between neighbouring patch centres; None = the patch
    # size (the paper's non-overlapping grid).  Smaller: one patch centred on each
    # stride-sized cell, a finer heatmap for (stride/patch)^-2 times the patches.
    stride: int | None = None

@dataclass(frozen=True)
class RefineConfig:
    """Refinement networks (Section 3.4)."""

    size: int = 1024
    width: float = 1.0  # filter multiplier of the refinement nets
    batch_size: int = 4
    accumulation_steps: int = 6
    learning_rate: float = 1e-3
    epochs: int = 1000
    patience: int = 100
    augment: bool = True
    loss: str = "dice"  # "dice" or "crossentropy"
    # micro-batches per epoch; None = one pass over the training slides (the paper's)
    steps_per_epoch: int | None = None
    bn_momentum: float | None = None  # see ClassifierConfig.bn_momentum


SECTIONS = {"classifier": ClassifierConfig, "cluster": ClusterConfig, "heatmap": HeatmapConfig,
            "refine": RefineConfig}


def smoke() -> dict:
    """Tiny models and few batches: every design end to end in minutes on 2 CPU cores."""
    return {
        "classifier": ClassifierConfig(
            alpha=0.35, inception_width=0.25, weights=None, batch_size=32,
            train_batches=40, val_batches=8, epochs=8,
            learning_rate=1e-3, bn_momentum=0.9,
        ),
        "cluster": ClusterConfig(n_batches=8, batch_size=32, weights=None, feature_size=64),
        # half-patch stride: a smoke slide is only 6-10 patches a side, and on that grid even
        # a perfect classifier's heatmap reaches test Dice 0.78 (0.90 at half stride:
        # tools/heatmap_ceiling.py); the paper's slides are ~100 patches a side
        "heatmap": HeatmapConfig(batch_size=64, readers=2, stride=128),
        "refine": RefineConfig(
            size=256, width=0.5, batch_size=4, accumulation_steps=1,
            # 150 epochs of 6 batches without early stopping (the best validation epoch
            # is kept): 60 left Mob-PW-UNet no better than its own heatmap (0.635 vs 0.614)
            epochs=150, patience=150, steps_per_epoch=6, bn_momentum=0.9,
        ),
    }


PRESETS = {"smoke": smoke}
