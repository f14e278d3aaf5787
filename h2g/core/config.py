"""Configuration in one place: the `paper` preset (the paper's hyperparameters) and the
`smoke` preset (the whole pipeline in minutes on a 2-core CPU), plus the run-folder
layout.

A :class:`Config` is a tree of frozen dataclasses; ``config.to_dict()`` is what a run
writes to ``config.json`` and what stage cache keys are hashed from.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence, get_args, get_origin

from h2g.core.errors import ConfigError


@dataclass(frozen=True)
class PatchConfig:
    """Tissue detection and patch grids (paper Section 2.2)."""

    magnification: float = 10.0  # the paper's "x100"
    patch_size: int = 256
    tissue_threshold: float = 0.25  # keep a patch with > 25 % tissue
    tumour_threshold: float = 0.25  # > 25 % tumour -> tumour; 0 % -> non-tumour
    tissue_magnification: float = 1.25
    saturation_threshold: int = 20
    annotation_downsample: float = 4.0


@dataclass(frozen=True)
class SamplerConfig:
    """Hierarchical sampler (Section 2.3): uniform at each stage."""

    stages: tuple[str, ...] = ("grade", "slide", "class", "patch")
    readers: int = 8  # parallel patch readers (the paper used eight workers)


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


@dataclass(frozen=True)
class EvalConfig:
    threshold: float = 0.5
    figure_slides: int = 4


@dataclass(frozen=True)
class Config:
    preset: str = "paper"
    seed: int = 0
    patches: PatchConfig = field(default_factory=PatchConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    dmmn: DMMNConfig = field(default_factory=DMMNConfig)
    munet: MUNetConfig = field(default_factory=MUNetConfig)
    razn: RAZNConfig = field(default_factory=RAZNConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def override(self, assignments: Sequence[str]) -> "Config":
        """A copy with ``section.field=value`` assignments applied (``seed=3`` for a
        top-level field), as given on the command line by ``--set``.  Values are parsed
        as the field's type: numbers, ``true``/``false``, ``none``, and comma-separated
        tuples; :class:`ConfigError` names an unknown key or a value of the wrong type."""
        config = self
        for text in assignments:
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set {text!r}: expected section.field=value")
            config = _assign(config, key.split("."), raw.strip(), key)
        return config


def _smoke() -> Config:
    """Tiny models and few batches: every design end to end in minutes on 2 CPU cores."""
    return Config(
        preset="smoke",
        sampler=SamplerConfig(readers=2),
        classifier=ClassifierConfig(
            alpha=0.35, inception_width=0.25, weights=None, batch_size=32,
            train_batches=40, val_batches=8, epochs=8,
            learning_rate=1e-3, bn_momentum=0.9,
        ),
        cluster=ClusterConfig(n_batches=8, batch_size=32, weights=None, feature_size=64),
        # half-patch stride: a smoke slide is only 6-10 patches a side, and on that grid even
        # a perfect classifier's heatmap reaches test Dice 0.78 (0.90 at half stride:
        # tools/heatmap_ceiling.py); the paper's slides are ~100 patches a side
        heatmap=HeatmapConfig(batch_size=64, readers=2, stride=128),
        refine=RefineConfig(
            size=256, width=0.5, batch_size=4, accumulation_steps=1,
            # 150 epochs of 6 batches without early stopping (the best validation epoch
            # is kept): 60 left Mob-PW-UNet no better than its own heatmap (0.635 vs 0.614)
            epochs=150, patience=150, steps_per_epoch=6, bn_momentum=0.9,
        ),
        # DMMN at 1/8 width with Adam: the paper's SGD at lr 5e-5 needs days, not minutes
        dmmn=DMMNConfig(width=0.125, batch_size=8, train_batches=40, val_batches=4, epochs=8,
                        optimizer="adam", learning_rate=1e-3, weight_decay=0.0),
        # m-UNet with tiny EfficientNets on 128 px views, two short master rounds
        munet=MUNetConfig(size=128, base_encoder="w0.25d0.1", master_encoder="w0.35d0.2", decoder_width=0.125,
                          merge_filters=(32, 16), final_filters=8, bn_momentum=0.9, batch_size=8, train_batches=25,
                          val_batches=3, base_epochs=8, base_learning_rate=2e-3, thresholds=(0.8, 0.6), learning_rates=(1e-3, 5e-4),
                          epochs=(3, 3), dynamic_weights=(True, False),
                          augment=("basic+colour+noise", "basic+heavy+noise+hsv+jitter"), stride=128,
                          inference_batch=32, auc_pixels=50_000),

        # RAZN at 1/8 width on 64 px regions at 5x (x1: 128 px at 10x), 300 steps; lr 1e-3
        # as DMMN's smoke (the paper's 0.01 was not tried at this width)
        razn=RAZNConfig(size=64, magnification=5.0, width=0.125, attention_width=8, batch_size=8, steps=300,
                        learning_rate=1e-3, decay_steps=200, checkpoint_every=50, timing_regions=50),
    )


PRESETS = {"paper": Config, "smoke": _smoke}


def load_config(preset: str = "smoke", seed: int = 0) -> Config:
    """The named preset with the given seed; :class:`ConfigError` for an unknown name."""
    try:
        factory = PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}") from None
    return factory().replace(seed=seed)



def _assign(node, path: list[str], raw: str, key: str):
    names = {f.name: f for f in dataclasses.fields(node)}
    if path[0] not in names:
        raise ConfigError(f"--set {key}: unknown {'field' if len(path) == 1 else 'section'} {path[0]!r}; "
                          f"choose from {', '.join(n for n in names if n != 'preset')}")
    value = getattr(node, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"--set {key}: {path[0]!r} is a value, not a section")
        return dataclasses.replace(node, **{path[0]: _assign(value, path[1:], raw, key)})
    if dataclasses.is_dataclass(value):
        raise ConfigError(f"--set {key}: {path[0]!r} is a section; set one of its fields ({key}.FIELD=VALUE)")
    hint = typing.get_type_hints(type(node))[path[0]]
    return dataclasses.replace(node, **{path[0]: _parse(raw, hint, key)})


def _parse(raw: str, hint, key: str):
    """``raw`` as a value of type ``hint`` (int, float, bool, str, None-able, tuple)."""
    args = get_args(hint)
    if get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if raw.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(raw, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"--set {key}: cannot parse {raw!r}")
    if get_origin(hint) is tuple:
        item = args[0] if args else str
        return tuple(_parse(part.strip(), item, key) for part in raw.split(",") if part.strip())
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
    except ValueError:
        raise ConfigError(f"--set {key}: {raw!r} is not a valid {hint.__name__}") from None
    raise ConfigError(f"--set {key}: fields of type {hint} cannot be set from the command line")
