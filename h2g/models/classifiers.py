"""Patch classifiers (Section 2.3 and 3.2): MobileNetV2 and InceptionV3 backbones from
``keras.applications`` with the paper's simplified head.

Input ``image``: (B, S, S, 3) float32 in [0, 1] (S = 256 at x100 in the paper).  Both
backbones expect [-1, 1]; the model does that itself with a ``Rescaling(2, -1)`` layer
(a plain layer, so it serialises and exports).  Head: global average pooling ->
Dense(100) -> Dropout(0.5) -> ReLU -> BatchNormalization -> Dense(n_classes, softmax),
output named ``classification``.  The backbone is the nested model ``backbone`` (freeze
it with ``model.get_layer("backbone").trainable = False``).

Full size: MobileNetV2 2,386,686 parameters (paper ~2.39M), InceptionV3 22,008,286
(paper ~22.00M).

Small versions for tests and smoke runs: MobileNetV2 takes Keras' width multiplier
``alpha``.  ``keras.applications.InceptionV3`` has none, so ``width`` != 1 clones the
Keras architecture (``keras.models.clone_model``) with every convolution's filter count
multiplied by ``width`` (at least 1; InceptionV3 joins branches by concatenation only,
so any counts fit together); ``width=1`` is Keras' model unchanged.  Minimum
``input_size``: 75 for InceptionV3, 32 for MobileNetV2.

``weights="imagenet"`` loads the Keras application's no-top weights file from Keras'
cache (``$KERAS_HOME/models`` or ``~/.keras/models``) without ever trying to download
it; when the file is not there, :class:`~h2g.core.errors.ModelError` says which file to put
where.
"""
from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

import keras
from keras import layers

from h2g.core.errors import ConfigError, ModelError
from h2g.models.blocks import check_n_classes, check_positive

WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # those with ImageNet weights
MOBILENET_WEIGHT_SIZES = (96, 128, 160, 192, 224)
HEAD_UNITS = 100
HEAD_DROPOUT = 0.5


def keras_cache_dirs() -> list[Path]:
    """Folders where Keras keeps downloaded model files, in Keras' order of preference:
    ``$KERAS_HOME/models`` (or ``~/.keras/models``), then ``/tmp/.keras/models`` (Keras'
    fallback when the home folder is not writable)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return [Path(home) / "models", Path("/tmp/.keras/models")]


def cached_weights(file_name: str, url: str, arch: str) -> Path:
    """The cached ImageNet weights file ``file_name``; :class:`ModelError` when absent."""
    for folder in keras_cache_dirs():
        if (folder / file_name).is_file():
            return folder / file_name
    raise ModelError(
        f"{arch}: ImageNet weights file {file_name} is not in Keras' cache "
        f"({keras_cache_dirs()[0]}) and there is no download at run time; copy it there "
        f"(it is {url}) or use weights=None"
    )


def _load_weights(backbone: keras.Model, path: Path, arch: str) -> None:
    try:
        backbone.load_weights(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load it as {arch} ImageNet weights ({exc})") from exc


def _check_common(arch: str, n_classes: int, input_size: int, min_size: int, weights) -> int:
    """Validates the common options; returns ``n_classes`` as an int."""
    n_classes = check_n_classes(n_classes, arch)
    if not isinstance(input_size, Integral) or input_size < min_size:
        raise ConfigError(f"{arch}: input_size must be an integer >= {min_size}, got {input_size!r}")
    if weights not in (None, "imagenet"):
        raise ConfigError(f"{arch}: weights must be None or 'imagenet', got {weights!r}")
    return n_classes


def _with_head(backbone: keras.Model, input_size: int, n_classes: int, name: str) -> keras.Model:
    """Input in [0, 1] -> [-1, 1] -> backbone -> the paper's simplified head."""
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(inputs)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dense(HEAD_UNITS, name="head_dense")(x)
    x = layers.Dropout(HEAD_DROPOUT, name="head_dropout")(x)
    x = layers.ReLU(name="head_relu")(x)
    x = layers.BatchNormalization(name="head_bn")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="classification")(x)
    return keras.Model(inputs, outputs, name=name)


def build_mobilenetv2(n_classes: int = 2, input_size: int = 256, alpha: float = 1.0,
                      weights: str | None = None) -> keras.Model:
    """MobileNetV2 patch classifier: ``image`` (S, S, 3) in [0, 1] -> ``classification``
    (n_classes) softmax.  ``alpha``: MobileNetV2's width multiplier; with
    ``weights="imagenet"`` one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4."""
    arch = "mobilenetv2"
    n_classes = _check_common(arch, n_classes, input_size, 32, weights)
    check_positive(alpha, "alpha", arch)
    path = None
    if weights == "imagenet":
        if float(alpha) not in MOBILENET_ALPHAS:
            raise ConfigError(f"{arch}: ImageNet weights exist for alpha in {MOBILENET_ALPHAS}, got {alpha!r}")
        # Keras' file for the nearest trained size (224 otherwise, as Keras does); the
        # convolutions fit any input size
        rows = input_size if input_size in MOBILENET_WEIGHT_SIZES else 224
        file_name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
        path = cached_weights(file_name, f"{WEIGHTS_URL}/mobilenet_v2/{file_name}", arch)
    backbone = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3), alpha=alpha, include_top=False,
        weights=None, name="backbone",
    )
    if path is not None:
        _load_weights(backbone, path, arch)
    return _with_head(backbone, input_size, n_classes, arch)


def _scale_conv(width: float):
    """clone_model hook: every Conv2D with its filter count times ``width``."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, layers.Conv2D):
            config["filters"] = max(1, int(round(config["filters"] * width)))
        return layer.__class__.from_config(config)

    return clone


def build_inceptionv3(n_classes: int = 2, input_size: int = 256, width: float = 1.0,
                      weights: str | None = None) -> keras.Model:
    """InceptionV3 patch classifier: ``image`` (S, S, 3) in [0, 1] -> ``classification``
    (n_classes) softmax.  ``width`` != 1 scales every convolution's filter count
    (ImageNet weights need ``width=1``)."""
    arch = "inceptionv3"
    n_classes = _check_common(arch, n_classes, input_size, 75, weights)
    check_positive(width, "width", arch)
    if weights == "imagenet" and width != 1:
        raise ConfigError(f"{arch}: ImageNet weights need width=1, got {width!r}")
    path = None
    if weights == "imagenet":
        file_name = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
        path = cached_weights(file_name, f"{WEIGHTS_URL}/inception_v3/{file_name}", arch)
    backbone = keras.applications.InceptionV3(
        input_shape=(input_size, input_size, 3), include_top=False, weights=None, name="backbone",
    )
    if width != 1:
        backbone = keras.models.clone_model(backbone, clone_function=_scale_conv(width))
    if path is not None:
        _load_weights(backbone, path, arch)
    return _with_head(backbone, input_size, n_classes, arch)
