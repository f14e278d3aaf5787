"""U-Net refinement network (design VI) and UNet-LR (design II).

Section 3.2: nine levels with filters {8, 16, 32, 64, 128, 128, 256, 256, 512} from top
to bottom; the encoder block is (Convolution-BatchNormalization-ReLU) x 2 -> MaxPooling;
the decoder is symmetric; softmax output.  Where the paper is silent we follow
Ronneberger et al.'s U-Net and the H2G-Net release:

- 3x3 convolutions with bias, "same" padding; 2x2 max pooling (eight poolings, so the
  input side must be a multiple of 256; the 512-filter level is the bottleneck);
- decoder: 2x nearest-neighbour upsampling, concatenation with the skip connection,
  then the same (Conv-BN-ReLU) x 2 block, with SpatialDropout2D(0.1) after each ReLU in
  the decoder only (as trained in the release);
- 1x1 convolution + softmax over ``n_classes``, output named ``segmentation``.

Full size with image + heatmap input: 11,572,562 parameters (paper ~11.58M; the release
used batch renormalisation, whose two extra statistics per channel account for the
difference).  UNet-LR is the same network on the image alone (72 fewer weights).
"""
from __future__ import annotations

import keras
from keras import layers

from h2g.models.blocks import (
    check_input_size,
    check_n_classes,
    conv_block,
    refinement_inputs,
    scaled_filters,
    softmax_head,
)

UNET_FILTERS = (8, 16, 32, 64, 128, 128, 256, 256, 512)
DECODER_DROPOUT = 0.1


def _unet(name: str, n_classes: int, input_size: int, width: float, with_heatmap: bool) -> keras.Model:
    n_classes = check_n_classes(n_classes, name)
    filters = scaled_filters(UNET_FILTERS, width, name)
    input_size = check_input_size(input_size, len(filters) - 1, name)
    inputs, x = refinement_inputs(input_size, with_heatmap)
    skips = []
    for level, f in enumerate(filters[:-1], start=1):
        x = conv_block(x, f, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = conv_block(x, filters[-1], "bottleneck")
    for level in range(len(skips), 0, -1):
        x = layers.UpSampling2D(2, name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([skips[level - 1], x])
        x = conv_block(x, filters[level - 1], f"dec{level}", dropout=DECODER_DROPOUT)
    return keras.Model(inputs, softmax_head(x, n_classes, "segmentation"), name=name)


def build_unet(n_classes: int = 2, input_size: int = 1024, width: float = 1.0) -> keras.Model:
    """U-Net refinement net: inputs ``image`` (S, S, 3) and ``heatmap`` (S, S, 1) ->
    ``segmentation`` (S, S, n_classes) softmax.  ``input_size`` S: a multiple of 256;
    ``width`` scales every filter count (at least 2)."""
    return _unet("unet", n_classes, input_size, width, with_heatmap=True)


def build_unet_lr(n_classes: int = 2, input_size: int = 1024, width: float = 1.0) -> keras.Model:
    """UNet-LR (design II): the same U-Net on the low-resolution ``image`` alone."""
    return _unet("unet_lr", n_classes, input_size, width, with_heatmap=False)
