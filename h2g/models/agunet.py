"""AGU-Net refinement network (design VII): attention-gated U-Net with multi-scale input
and deep supervision (Bouget et al. 2021, ref. 24 of the paper).

Section 3.2 fixes the filters {8, 16, 32, 64, 128, 128, 256, 256} (eight levels: seven
encoder blocks, the 256-filter bottleneck) and the (Conv-BN-ReLU) x 2 blocks.  Choices
where the paper is silent, after Bouget et al. and the H2G-Net release:

- multi-scale input: the 4-channel input is average-pooled to every encoder level,
  passed through a 3x3 Conv-ReLU and concatenated before that level's block
  (:func:`h2g.models.blocks.pyramid_encoder`); seven 2x2 max poolings, so the input side
  must be a multiple of 128;
- decoder level: 3x3 stride-2 transposed convolution -> BN -> ReLU (the gating signal
  g), an additive attention gate (Oktay et al.) on the skip connection with g at the
  same resolution and C/2 intermediate channels, concatenation [g, gated skip], then
  the (Conv-BN-ReLU) x 2 block;
- deep supervision: a 1x1 softmax head on every decoder level (outputs ``deep_k`` from
  the level at 1/2**k, resized to full resolution, plus the final ``segmentation``);
  ``deep_supervision=False`` (the default) builds the single-output inference model,
  which has the same layers minus the auxiliary heads.

Full size: 7,666,961 parameters without and 7,668,221 with the deep-supervision heads
(paper ~7.68M, -0.2 %; the release's batch renormalisation adds two statistics per
channel, and its gates concatenate rather than add Wg g and Wx x).
"""
from __future__ import annotations

import keras
from keras import layers

from h2g.models.blocks import (
    attention_gate,
    check_input_size,
    check_n_classes,
    conv_block,
    deep_supervision_heads,
    pyramid_encoder,
    refinement_inputs,
    scaled_filters,
    softmax_head,
)

AGUNET_FILTERS = (8, 16, 32, 64, 128, 128, 256, 256)


def up_block(x, filters: int, name: str):
    """3x3 stride-2 transposed convolution -> BN -> ReLU (doubles the resolution)."""
    x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", name=f"{name}_upconv")(x)
    x = layers.BatchNormalization(name=f"{name}_up_bn")(x)
    return layers.ReLU(name=f"{name}_up_relu")(x)


def build_agunet(n_classes: int = 2, input_size: int = 1024, width: float = 1.0,
                 deep_supervision: bool = False) -> keras.Model:
    """AGU-Net: inputs ``image`` (S, S, 3) and ``heatmap`` (S, S, 1) -> ``segmentation``
    (S, S, n_classes) softmax [+ ``deep_1`` ... ``deep_6`` with ``deep_supervision``].
    ``input_size`` S: a multiple of 128; ``width`` scales every filter count."""
    name = "agunet"
    n_classes = check_n_classes(n_classes, name)
    filters = scaled_filters(AGUNET_FILTERS, width, name)
    input_size = check_input_size(input_size, len(filters) - 1, name)
    inputs, x = refinement_inputs(input_size)
    x, skips = pyramid_encoder(x, filters[:-1])
    x = conv_block(x, filters[-1], "bottleneck")
    decoded = []
    for level in range(len(skips), 0, -1):
        g = up_block(x, filters[level - 1], f"dec{level}")
        gated = attention_gate(g, skips[level - 1], f"dec{level}_gate")
        x = layers.Concatenate(name=f"dec{level}_concat")([g, gated])
        x = conv_block(x, filters[level - 1], f"dec{level}")
        decoded.append(x)
    outputs = softmax_head(x, n_classes, "segmentation")
    if deep_supervision:
        outputs = [outputs, *deep_supervision_heads(decoded, n_classes)]
    return keras.Model(inputs, outputs, name=name)
