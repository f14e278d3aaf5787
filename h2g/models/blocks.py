"""Building blocks shared by the refinement networks (U-Net family).

Plain functions over Keras functional tensors plus two small serialisable layers (the
DANet position and channel attention modules).  Every layer gets an explicit name built
from the caller's ``name`` prefix, so models have stable, readable layer and ONNX node
names.  Only ops that tf2onnx and OpenVINO convert are used (convolutions, batch norm,
pooling, resizing, concatenation, multiply/add, reshape, transpose, matmul, softmax,
reduce-max).
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Sequence

import keras
from keras import layers, ops

from h2g.core.errors import ConfigError

MIN_FILTERS = 2  # the smallest filter count a width multiplier may produce


# --------------------------------------------------------------------------- checks
def check_n_classes(n_classes: int, arch: str) -> int:
    """The output is a softmax over classes, so at least two are needed."""
    if not isinstance(n_classes, Integral) or n_classes < 2:
        raise ConfigError(f"{arch}: n_classes must be an integer >= 2 (softmax output), got {n_classes!r}")
    return int(n_classes)


def check_input_size(input_size: int, poolings: int, arch: str) -> int:
    """``input_size`` must be a positive multiple of ``2**poolings`` so that every
    pooling halves an even side and the decoder meets its skip connections."""
    step = 2**poolings
    if not isinstance(input_size, Integral) or input_size <= 0 or input_size % step:
        raise ConfigError(
            f"{arch}: input_size must be a positive multiple of {step} (the network pools "
            f"{poolings} times), got {input_size!r}"
        )
    return int(input_size)


def check_positive(value, option: str, arch: str) -> None:
    """``option`` (a width multiplier or a filter count) must be a number > 0."""
    if not isinstance(value, Real) or not value > 0:
        raise ConfigError(f"{arch}: {option} must be a number > 0, got {value!r}")


def scaled_filters(filters: Sequence[int], width: float, arch: str) -> list[int]:
    """Filter counts times the width multiplier, rounded, at least :data:`MIN_FILTERS`."""
    check_positive(width, "width", arch)
    return [max(MIN_FILTERS, int(round(f * width))) for f in filters]


# --------------------------------------------------------------------------- inputs / heads
def refinement_inputs(input_size: int, with_heatmap: bool = True):
    """The refinement nets' inputs: ``image`` (S, S, 3) and ``heatmap`` (S, S, 1), both
    float32 in [0, 1].  Returns ``(inputs, x)`` where ``x`` is the image, or image and
    heatmap concatenated along channels (4 channels)."""
    image = keras.Input((input_size, input_size, 3), name="image")
    if not with_heatmap:
        return [image], image
    heatmap = keras.Input((input_size, input_size, 1), name="heatmap")
    return [image, heatmap], layers.Concatenate(name="image_heatmap")([image, heatmap])


def softmax_head(x, n_classes: int, name: str):
    """1x1 convolution to ``n_classes`` followed by a softmax layer called ``name``."""
    x = layers.Conv2D(n_classes, 1, name=f"{name}_logits")(x)
    return layers.Softmax(axis=-1, name=name)(x)


def deep_supervision_heads(decoded: Sequence, n_classes: int) -> list:
    """Deep supervision: a softmax head on every decoder level but the last, each
    resized to the input resolution (bilinear on the probabilities, which keeps them
    summing to one) so that all outputs share one target.  ``decoded`` runs from coarse
    to fine and ends at full resolution; the output from the level at 1/2**k of the input
    is called ``deep_k``."""
    outputs = []
    depth = len(decoded) - 1
    for level, x in enumerate(decoded[:-1]):
        k = depth - level
        p = softmax_head(x, n_classes, f"deep_{k}_probs")
        outputs.append(layers.UpSampling2D(2**k, interpolation="bilinear", name=f"deep_{k}")(p))
    return outputs


# --------------------------------------------------------------------------- convolutions
def conv_bn_relu(x, filters: int, name: str, kernel_size: int = 3, dilation_rate: int = 1,
                 use_bias: bool = True, dropout: float = 0.0):
    """Convolution -> BatchNormalization -> ReLU [-> SpatialDropout2D]."""
    x = layers.Conv2D(filters, kernel_size, padding="same", dilation_rate=dilation_rate,
                      use_bias=use_bias, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    if dropout:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_drop")(x)
    return x


def conv_block(x, filters: int, name: str, dropout: float = 0.0):
    """The paper's block: (3x3 Convolution -> BatchNormalization -> ReLU) x 2."""
    x = conv_bn_relu(x, filters, f"{name}_1", dropout=dropout)
    return conv_bn_relu(x, filters, f"{name}_2", dropout=dropout)


def squeeze_excite(x, name: str, ratio: int = 8):
    """Squeeze-and-excitation (Hu et al.): global average pool -> Dense(C/ratio, ReLU) ->
    Dense(C, sigmoid) -> channel-wise rescaling; no biases, as in DoubleU-Net."""
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    s = layers.Dense(max(1, channels // ratio), activation="relu", use_bias=False,
                     kernel_initializer="he_normal", name=f"{name}_reduce")(s)
    s = layers.Dense(channels, activation="sigmoid", use_bias=False,
                     kernel_initializer="he_normal", name=f"{name}_expand")(s)
    return layers.Multiply(name=f"{name}_scale")([x, s])


def attention_gate(g, x, name: str):
    """Additive attention gate (Oktay et al.): ``x * sigmoid(psi(relu(Wg g + Wx x)))``
    with 1x1 convolutions + batch norm for Wg, Wx (to C/2 channels, C = channels of
    ``g``) and psi (to one channel).  ``g`` (the upsampled decoder features) and ``x``
    (the skip connection) have the same spatial size."""
    inter = max(1, g.shape[-1] // 2)
    g1 = layers.Conv2D(inter, 1, name=f"{name}_wg")(g)
    g1 = layers.BatchNormalization(name=f"{name}_wg_bn")(g1)
    x1 = layers.Conv2D(inter, 1, name=f"{name}_wx")(x)
    x1 = layers.BatchNormalization(name=f"{name}_wx_bn")(x1)
    psi = layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([g1, x1]))
    psi = layers.Conv2D(1, 1, name=f"{name}_psi")(psi)
    psi = layers.BatchNormalization(name=f"{name}_psi_bn")(psi)
    psi = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi)
    return layers.Multiply(name=f"{name}_gated")([x, psi])


def aspp(x, filters: int, name: str, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.0):
    """Atrous spatial pyramid pooling (DeepLabv3, as in DoubleU-Net): image pooling,
    a 1x1 convolution and one dilated 3x3 convolution per rate, each Conv-BN-ReLU,
    concatenated and fused by a 1x1 Conv-BN-ReLU."""
    h, w = x.shape[1], x.shape[2]
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = conv_bn_relu(pooled, filters, f"{name}_image", kernel_size=1, dropout=dropout)
    branches = [layers.UpSampling2D((h, w), name=f"{name}_image_up")(pooled)]
    branches.append(conv_bn_relu(x, filters, f"{name}_1x1", kernel_size=1, use_bias=False, dropout=dropout))
    for rate in rates:
        branches.append(conv_bn_relu(x, filters, f"{name}_rate{rate}", dilation_rate=rate,
                                     use_bias=False, dropout=dropout))
    y = layers.Concatenate(name=f"{name}_concat")(branches)
    return conv_bn_relu(y, filters, f"{name}_fuse", kernel_size=1, use_bias=False, dropout=dropout)


# --------------------------------------------------------------------------- encoders
def pyramid_encoder(x, filters: Sequence[int], name: str = "enc"):
    """Encoder with multi-scale input (Bouget et al.'s AGU-Net): before every block but
    the first, the network input average-pooled to that level's resolution goes through
    a 3x3 Conv-ReLU and is concatenated with the features.  Each block is
    :func:`conv_block` then 2x2 max pooling.  Returns ``(pooled, skips)``, the skips
    from fine to coarse."""
    scaled = x
    skips = []
    for level, f in enumerate(filters, start=1):
        if level > 1:
            scaled = layers.AveragePooling2D(2, name=f"{name}{level}_input_pool")(scaled)
            side = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"{name}{level}_input_conv")(scaled)
            x = layers.Concatenate(name=f"{name}{level}_input_concat")([side, x])
        x = conv_block(x, f, f"{name}{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"{name}{level}_pool")(x)
    return x, skips


# --------------------------------------------------------------------------- dual attention
def _flatten_positions(x):
    """(B, H, W, C) -> (B, H*W, C)."""
    shape = ops.shape(x)
    return ops.reshape(x, (-1, shape[1] * shape[2], shape[3]))


@keras.saving.register_keras_serializable(package="h2g")
class PositionAttention(layers.Layer):
    """DANet's position attention module (Fu et al. 2019).

    Query and key are 1x1 convolutions to C/``reduction`` channels, value a 1x1
    convolution to C; ``attention = softmax(Q K^T)`` over the H*W positions and the
    output is ``x + gamma * (attention V)`` with a learnt scalar ``gamma`` that starts
    at zero.  Memory grows with (H*W)^2, so it belongs on coarse feature maps.
    """

    def __init__(self, reduction: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.reduction = reduction

    def build(self, input_shape):
        channels = input_shape[-1]
        inner = max(1, channels // self.reduction)
        self.query = layers.Conv2D(inner, 1, name="query")
        self.key = layers.Conv2D(inner, 1, name="key")
        self.value = layers.Conv2D(channels, 1, name="value")
        for conv in (self.query, self.key, self.value):
            conv.build(input_shape)
        self.gamma = self.add_weight(shape=(), initializer="zeros", name="gamma")

    def call(self, x):
        q = _flatten_positions(self.query(x))
        k = _flatten_positions(self.key(x))
        v = _flatten_positions(self.value(x))
        attention = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 2, 1))), axis=-1)
        out = ops.reshape(ops.matmul(attention, v), ops.shape(x))
        return x + self.gamma * out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction}


@keras.saving.register_keras_serializable(package="h2g")
class ChannelAttention(layers.Layer):
    """DANet's channel attention module (Fu et al. 2019).

    With A the (H*W, C) features, ``energy = A^T A`` (C x C), ``attention =
    softmax(max(energy) - energy)`` per row, and the output is ``x + gamma *
    (A attention^T)`` with a learnt scalar ``gamma`` that starts at zero.
    """

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(), initializer="zeros", name="gamma")

    def call(self, x):
        a = _flatten_positions(x)
        energy = ops.matmul(ops.transpose(a, (0, 2, 1)), a)
        energy = ops.max(energy, axis=-1, keepdims=True) - energy
        attention = ops.softmax(energy, axis=-1)
        out = ops.reshape(ops.matmul(a, ops.transpose(attention, (0, 2, 1))), ops.shape(x))
        return x + self.gamma * out

    def compute_output_shape(self, input_shape):
        return input_shape
