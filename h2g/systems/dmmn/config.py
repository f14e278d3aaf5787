"""DMMN's configuration section ``dmmn`` (the paper's values are the defaults)."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class DMMNConfig:
    """DMMN (Ho et al.): three co-centred ``size`` px views at ``magnifications`` (20x,
    10x, 5x), the target the label map of the first; weighted cross-entropy with the
    training set's class weights; SGD as in the paper (Section II-E); the model with the
    best validation mIoU is kept; sliding-window inference with ``stride`` (20x px)."""

    size: int = 256
    magnifications: tuple[float, ...] = (20.0, 10.0, 5.0)
    width: float = 1.0  # filter multiplier of the authors' 32-64-128-256-512
    min_labelled: float = 0.01  # a training patch needs > 1 % annotated target pixels
    tissue_threshold: float = 0.05  # training patches: tissue fraction above this
    batch_size: int = 16
    train_batches: int = 1000
    val_batches: int = 100
    epochs: int = 20
    optimizer: str = "sgd"  # "sgd" (the paper) or "adam"
    learning_rate: float = 5e-5
    momentum: float = 0.99
    weight_decay: float = 1e-4
    accumulation_steps: int = 1
    patience: int | None = None
    augment: bool = True
    stride: int = 256  # inference: 20x px between windows (the target view's size: no overlap)
    inference_batch: int = 8


SECTIONS = {"dmmn": DMMNConfig}


def smoke() -> dict:
    # DMMN at 1/8 width with Adam: the paper's SGD at lr 5e-5 needs days, not minutes
    return {"dmmn": DMMNConfig(width=0.125, batch_size=8, train_batches=40, val_batches=4, epochs=8,
                               optimizer="adam", learning_rate=1e-3, weight_decay=0.0)}


PRESETS = {"smoke": smoke}
