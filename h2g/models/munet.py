"""m-UNet (multi-level, multi-class, multi-stain U-Net; ``../shared/paper/multiclass-multistain-unet.txt``,
Figs. 9-10): two U-Nets with ``keras.applications`` EfficientNet encoders, one on a
high-resolution view, one on a low-resolution view of the same centre, joined by a
pixel-aligned merge.

- ``build_unet_effnet``: one U-Net (the base model, U-Net-B0): input ``x_hi`` ->
  ``segmentation``.
- ``build_munet``: inputs ``x_hi`` and ``x_lo`` (both ``(S, S, 3)`` float in [0, 1], the
  low view covering ``ratio`` times the high view's field) -> outputs ``segmentation``
  (final), ``high`` (the high branch's own head, on ``x_hi``'s grid) and ``low`` (on
  ``x_lo``'s grid).

Merge (Fig. 10): the low branch's features at its second-to-last encoder block (stride
16) are compressed by stacked 1x1 convolutions, centre-cropped to the high view's field
(``1 / ratio`` of the map, exactly centred) and resized by ``ratio`` onto the high
branch's stride-16 grid, concatenated with the high branch's second-to-last encoder
block and compressed again by 1x1 convolutions; the result is the skip feature the high
decoder reads at stride 16.  Final layer (Fig. 9): the low branch's output logits are
centre-cropped to the high field, resized to ``S`` and concatenated with the high
branch's logits; 1x1 convolutions give the final class probabilities.

Encoders: ``"b0"`` ... ``"b7"`` are ``keras.applications.EfficientNetB*``;
``"w<width>d<depth>"`` (e.g. ``"w0.25d0.1"``) builds EfficientNet with those width and
depth coefficients (tiny encoders for smoke runs and tests).  ``weights="imagenet"``
only when Keras has the file cached (no download at run time).
"""
from __future__ import annotations

import os
import re

import keras
from keras import layers

from h2g.core.errors import ConfigError

STRIDES = (2, 4, 8, 16, 32)
MERGE_STRIDE = 16  # the second-to-last encoder block
_B = {f"b{i}": (w, d) for i, (w, d) in enumerate(
    [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8), (1.6, 2.2), (1.8, 2.6), (2.0, 3.1)])}
_WEIGHT_FILES = {f"b{i}": f"efficientnetb{i}_notop.h5" for i in range(8)}


def encoder_coefficients(name: str) -> tuple[float, float]:
    if name in _B:
        return _B[name]
    match = re.fullmatch(r"w([0-9.]+)d([0-9.]+)", name)
    if not match:
        raise ConfigError(f"unknown EfficientNet encoder {name!r}; use b0..b7 or w<width>d<depth> (e.g. w0.25d0.1)")
    return float(match.group(1)), float(match.group(2))


def _check_weights(name: str, weights):
    if weights is None:
        return None
    if weights != "imagenet":
        raise ConfigError(f"encoder weights must be None or 'imagenet', got {weights!r}")
    if name not in _WEIGHT_FILES:
        raise ConfigError(f"encoder {name!r} has no ImageNet weights (only b0..b7 have)")
    cached = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models",
                          _WEIGHT_FILES[name])
    if not os.path.isfile(cached):
        raise ConfigError(f"ImageNet weights of EfficientNet{name.upper()} are not cached ({cached}); h2g downloads "
                          "nothing at run time: put the file there or use weights=None")
    return "imagenet"


def efficientnet_encoder(name: str, input_size: int, weights=None, prefix: str = "enc") -> keras.Model:
    """An EfficientNet feature extractor ``(S, S, 3)`` in [0, 1] -> its feature maps at
    strides 2, 4, 8, 16, 32 (the last layer of each resolution).  Its input rescaling
    (1/255) is dropped (inputs are in [0, 1]) and its normalisation made a frozen affine
    layer (:func:`_constant_normalisation`)."""
    from keras.src.applications import efficientnet

    width, depth = encoder_coefficients(name)
    weights = _check_weights(name, weights)
    base = efficientnet.EfficientNet(width, depth, input_size, include_top=False, weights=weights,
                                     input_shape=(input_size, input_size, 3), name=f"{prefix}_efficientnet_{name}",
                                     weights_name=name if weights else None)
    base = _constant_normalisation(base)
    found = {}
    for layer in base.layers:
        shape = layer.output.shape
        if len(shape) == 4 and shape[1]:
            stride = input_size // shape[1]
            if stride in STRIDES:
                found[stride] = layer.output  # the last layer at each stride
    missing = [s for s in STRIDES if s not in found]
    if missing:
        raise ConfigError(f"input size {input_size} gives no EfficientNet features at strides {missing}; "
                          f"use a multiple of 32")
    inp = keras.Input((input_size, input_size, 3), name=f"{prefix}_input")
    features = keras.Model(base.input, [found[s] for s in STRIDES], name=f"{prefix}_features")(inp)
    return keras.Model(inp, features, name=prefix)


def _constant_normalisation(base: keras.Model) -> keras.Model:
    """``base`` with its ``Normalization`` layer replaced by the equal per-channel affine
    map ``x * scale + offset`` (``scale = 1 / sqrt(var)``, ``offset = -mean * scale``) as a
    frozen 1x1 depthwise convolution, other weights kept.  The Normalization layer holds
    its statistics as tensors computed when it is built, which tf2onnx turns into extra
    graph inputs instead of constants; weights are frozen into constants."""
    import numpy as np

    affine = {}

    def clone(layer):
        if isinstance(layer, layers.Rescaling):  # 1/255 on the input: ours are in [0, 1] already
            scale = np.asarray(layer.scale, np.float64).reshape(-1)
            offset = np.asarray(layer.offset, np.float64).reshape(-1)
            if scale.size == 1 and abs(scale[0] * 255.0 - 1.0) < 1e-9 and not offset.any():
                return layers.Identity(name=layer.name)
            affine[layer.name] = ((scale * np.ones(3)).reshape(1, 1, -1, 1).astype("float32"),
                                  (offset * np.ones(3)).astype("float32"))
            return layers.DepthwiseConv2D(1, use_bias=True, trainable=False, name=layer.name)
        if isinstance(layer, layers.Normalization):
            mean = np.asarray(layer.mean, np.float64).reshape(-1)
            std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64).reshape(-1)), keras.config.epsilon())
            affine[layer.name] = ((1.0 / std).reshape(1, 1, -1, 1).astype("float32"),
                                  (-mean / std).astype("float32"))
            return layers.DepthwiseConv2D(1, use_bias=True, trainable=False, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(base, clone_function=clone)
    originals = {layer.name: layer for layer in base.layers}
    for layer in copy.layers:
        if layer.name in affine:
            layer.set_weights(list(affine[layer.name]))
            continue
        original = originals.get(layer.name)
        if original is not None and original.get_weights():
            layer.set_weights(original.get_weights())
    return copy


def _conv_bn(x, filters: int, name: str, kernel: int = 3):
    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _decoder(features, filters: tuple[int, ...], n_classes: int, prefix: str):
    """U-Net decoder from the stride-32 features up to full resolution; returns logits."""
    x = features[-1]
    skips = list(features[:-1])[::-1] + [None]  # strides 16, 8, 4, 2, then none (full resolution)
    for i, (skip, f) in enumerate(zip(skips, filters)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_up{i}")(x)
        if skip is not None:
            x = layers.Concatenate(name=f"{prefix}_cat{i}")([x, skip])
        x = _conv_bn(x, f, f"{prefix}_dec{i}a")
        x = _conv_bn(x, f, f"{prefix}_dec{i}b")
    return layers.Conv2D(n_classes, 1, name=f"{prefix}_logits")(x)


def centre_crop_resize(x, ratio: int, name: str, interpolation: str = "bilinear"):
    """The centre ``1 / ratio`` of a ``(B, n, n, C)`` map (``n / ratio`` whole pixels and
    an even margin, else a :class:`ConfigError`), upsampled by ``ratio`` back to ``n``:
    the low view's pixels that cover the high view's field, on the high view's grid."""
    n = int(x.shape[1])
    if n % ratio or (n - n // ratio) % 2:
        raise ConfigError(f"a {n} px map cannot be centre-cropped to 1/{ratio} exactly; choose the view size "
                          f"and magnification ratio so that it can")
    margin = (n - n // ratio) // 2
    x = layers.Cropping2D(((margin, margin), (margin, margin)), name=f"{name}_crop")(x)
    return layers.UpSampling2D(ratio, interpolation=interpolation, name=f"{name}_resize")(x)


def _decoder_filters(decoder_width: float) -> tuple[int, ...]:
    return tuple(max(4, int(round(f * decoder_width))) for f in (256, 128, 64, 32, 16))


def build_unet_effnet(n_classes: int = 3, input_size: int = 512, encoder: str = "b0", weights=None,
                      decoder_width: float = 1.0, input_name: str = "x_hi") -> keras.Model:
    """U-Net with an EfficientNet encoder (the base model): ``input_name`` -> ``segmentation``."""
    inp = keras.Input((input_size, input_size, 3), name=input_name)
    features = efficientnet_encoder(encoder, input_size, weights, prefix="enc_hi")(inp)
    logits = _decoder(features, _decoder_filters(decoder_width), n_classes, "hi")
    out = layers.Softmax(name="segmentation")(logits)
    return keras.Model(inp, out, name=f"unet_{encoder}")


def build_munet(n_classes: int = 3, input_size: int = 512, encoder: str = "b4", weights=None,
                decoder_width: float = 1.0, ratio: int = 4, merge_filters: tuple[int, ...] = (256, 64),
                final_filters: int = 16) -> keras.Model:
    """The two-branch m-UNet (see the module doc).  ``ratio``: the high view's
    magnification over the low view's (an integer: 4 for levels 1 and 3 of a 40x scan
    with downsample 2 per level, as the paper's best pair)."""
    if ratio < 1 or int(ratio) != ratio:
        raise ConfigError(f"the magnification ratio of the two views must be an integer >= 1, got {ratio}")
    ratio = int(ratio)
    hi = keras.Input((input_size, input_size, 3), name="x_hi")
    lo = keras.Input((input_size, input_size, 3), name="x_lo")
    f_hi = list(efficientnet_encoder(encoder, input_size, weights, prefix="enc_hi")(hi))
    f_lo = list(efficientnet_encoder(encoder, input_size, weights, prefix="enc_lo")(lo))
    filters = _decoder_filters(decoder_width)
    low_logits = _decoder(f_lo, filters, n_classes, "lo")
    k = STRIDES.index(MERGE_STRIDE)
    ctx = f_lo[k]
    for i, f in enumerate(merge_filters):  # stepwise non-linear compression of the low features
        ctx = _conv_bn(ctx, max(4, int(round(f * decoder_width))), f"merge_lo{i}", kernel=1)
    ctx = centre_crop_resize(ctx, ratio, "merge")
    merged = layers.Concatenate(name="merge_cat")([f_hi[k], ctx])
    merged = _conv_bn(merged, int(f_hi[k].shape[-1]), "merge_out0", kernel=1)
    merged = _conv_bn(merged, int(f_hi[k].shape[-1]), "merge_out1", kernel=1)
    f_hi[k] = merged
    high_logits = _decoder(f_hi, filters, n_classes, "hi")
    low_on_hi = centre_crop_resize(low_logits, ratio, "final_lo")
    x = layers.Concatenate(name="final_cat")([high_logits, low_on_hi])
    x = _conv_bn(x, max(4, int(final_filters)), "final0", kernel=1)
    logits = layers.Conv2D(n_classes, 1, name="final_logits")(x)
    outputs = {"segmentation": layers.Softmax(name="segmentation")(logits),
               "high": layers.Softmax(name="high")(high_logits),
               "low": layers.Softmax(name="low")(low_logits)}
    return keras.Model({"x_hi": hi, "x_lo": lo}, outputs, name=f"munet_{encoder}")
