"""DAGU-Net refinement network (design VIII): U-Net with dual attention, multi-scale
input and deep supervision (Bouget et al.'s dual attention U-Net, ref. 24, with the
dual attention module of DANet, Fu et al. 2019).

Section 3.2 fixes the filters {8, 16, 32, 64, 128, 128, 256, 256} (eight levels: seven
encoder blocks, the 256-filter bottleneck) and the (Conv-BN-ReLU) x 2 blocks.  Choices
where the paper is silent, after DANet, Bouget et al. and the H2G-Net release:

- the same multi-scale-input encoder as AGU-Net (seven poolings: the input side must be
  a multiple of 128);
- dual attention on the bottleneck features only (position attention costs (H*W)^2):
  a position attention branch and a channel attention branch
  (:class:`~h2g.models.blocks.PositionAttention`,
  :class:`~h2g.models.blocks.ChannelAttention`), each followed by 3x3 Conv-BN-ReLU,
  SpatialDropout2D(0.1) and a 3x3 convolution as in DANet's head; the branches are
  summed, dropped out (0.1) and fused by a 1x1 convolution + BN;
- decoder level: 3x3 stride-2 transposed convolution, concatenation with the skip
  connection, BN -> ReLU, then the (Conv-BN-ReLU) x 2 block (no attention gates: the
  attention is the bottleneck module);
- deep supervision as in AGU-Net (``deep_k`` outputs resized to full resolution; the
  default ``deep_supervision=False`` builds the single-output inference model).

Full size: 10,073,660 parameters without and 10,074,920 with the deep-supervision heads
(paper ~9.99M, +0.8 %).  The difference is exactly the position module's three 1x1
convolutions (82,240 weights): the release created them inside the layer's ``call``,
where TF 1.13 did not count them.
"""
from __future__ import annotations

import keras
from keras import layers

from h2g.models.blocks import (
    ChannelAttention,
    PositionAttention,
    check_input_size,
    check_n_classes,
    conv_block,
    conv_bn_relu,
    deep_supervision_heads,
    pyramid_encoder,
    refinement_inputs,
    scaled_filters,
    softmax_head,
)

DAGUNET_FILTERS = (8, 16, 32, 64, 128, 128, 256, 256)
ATTENTION_DROPOUT = 0.1


def dual_attention(x, name: str = "dual_attention"):
    """DANet's dual attention head on ``x``; same shape out."""
    filters = x.shape[-1]
    branches = []
    for kind, module in (("pam", PositionAttention), ("cam", ChannelAttention)):
        y = module(name=f"{name}_{kind}")(x)
        y = conv_bn_relu(y, filters, f"{name}_{kind}_a", dropout=ATTENTION_DROPOUT)
        branches.append(layers.Conv2D(filters, 3, padding="same", name=f"{name}_{kind}_b_conv")(y))
    y = layers.Add(name=f"{name}_sum")(branches)
    y = layers.SpatialDropout2D(ATTENTION_DROPOUT, name=f"{name}_drop")(y)
    y = layers.Conv2D(filters, 1, name=f"{name}_fuse_conv")(y)
    return layers.BatchNormalization(name=f"{name}_fuse_bn")(y)


def build_dagunet(n_classes: int = 2, input_size: int = 1024, width: float = 1.0,
                  deep_supervision: bool = False) -> keras.Model:
    """DAGU-Net: inputs ``image`` (S, S, 3) and ``heatmap`` (S, S, 1) -> ``segmentation``
    (S, S, n_classes) softmax [+ ``deep_1`` ... ``deep_6`` with ``deep_supervision``].
    ``input_size`` S: a multiple of 128; ``width`` scales every filter count."""
    name = "dagunet"
    n_classes = check_n_classes(n_classes, name)
    filters = scaled_filters(DAGUNET_FILTERS, width, name)
    input_size = check_input_size(input_size, len(filters) - 1, name)
    inputs, x = refinement_inputs(input_size)
    x, skips = pyramid_encoder(x, filters[:-1])
    x = conv_block(x, filters[-1], "bottleneck")
    x = dual_attention(x)
    decoded = []
    for level in range(len(skips), 0, -1):
        f = filters[level - 1]
        x = layers.Conv2DTranspose(f, 3, strides=2, padding="same", name=f"dec{level}_upconv")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([skips[level - 1], x])
        x = layers.BatchNormalization(name=f"dec{level}_concat_bn")(x)
        x = layers.ReLU(name=f"dec{level}_concat_relu")(x)
        x = conv_block(x, f, f"dec{level}")
        decoded.append(x)
    outputs = softmax_head(x, n_classes, "segmentation")
    if deep_supervision:
        outputs = [outputs, *deep_supervision_heads(decoded, n_classes)]
    return keras.Model(inputs, outputs, name=name)
