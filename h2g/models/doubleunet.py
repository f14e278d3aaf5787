"""DoubleU-Net refinement network (design IX; Jha et al. 2020, ref. 26 of the paper).

Two stacked U-Nets: the first segments the input, the second takes the input together
with the first network's prediction and refines it, reusing the first encoder's skip
connections.  Section 3.2 fixes the filters {8, 16, 32, 64, 128, 128, 256, 256} (eight
levels) and 42 ASPP filters.  Choices after Jha et al. and the H2G-Net release:

- block: (3x3 Conv-BN-ReLU-SpatialDropout2D(0.1)) x 2 followed by squeeze-and-excitation
  (ratio 8); 2x2 max pooling after each of the eight encoder blocks (the input side must
  be a multiple of 256); ASPP (image pooling, 1x1, and 3x3 convolutions at dilation
  rates 6, 12, 18) as the bottleneck of both networks; decoders upsample 2x bilinearly
  and concatenate the skips (the second decoder both encoders' skips);
- the first encoder is trained from scratch (Jha et al. use an ImageNet VGG-19; the paper
  trains all refinement nets from scratch, as the release did);
- output: Jha et al.'s networks end in a one-channel sigmoid, and the second network
  sees the input *multiplied* by the first mask.  Here, as in the H2G-Net release, both
  networks end in an ``n_classes`` softmax and the second one sees the input
  *concatenated* with the first network's probabilities (this works for any number of
  classes).  The second network's output is the model's output ``segmentation``
  (B, S, S, n_classes), like every other refinement net; with ``deep_supervision=True``
  the first network's output ``first_unet`` is a second output (the paper trains both,
  with equal loss weights).

Full size with 42 ASPP filters: 16,227,536 parameters (paper 16.04M, +1.2 %).  The
release's code used 32 ASPP filters with batch renormalisation, which gives exactly
16,040,052; ``aspp_filters=32`` here gives 16,025,076.
"""
from __future__ import annotations

import keras
from keras import layers

from h2g.models.blocks import (
    aspp,
    check_input_size,
    check_n_classes,
    check_positive,
    conv_block,
    refinement_inputs,
    scaled_filters,
    softmax_head,
    squeeze_excite,
)

DOUBLEUNET_FILTERS = (8, 16, 32, 64, 128, 128, 256, 256)
ASPP_FILTERS = 42
DROPOUT = 0.1


def se_block(x, filters: int, name: str):
    """(Conv-BN-ReLU-SpatialDropout) x 2 -> squeeze-and-excitation."""
    return squeeze_excite(conv_block(x, filters, name, dropout=DROPOUT), f"{name}_se")


def _encoder(x, filters, name: str):
    skips = []
    for level, f in enumerate(filters, start=1):
        x = se_block(x, f, f"{name}_enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"{name}_enc{level}_pool")(x)
    return x, skips


def _decoder(x, filters, skip_sets, name: str):
    for level in range(len(filters), 0, -1):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_dec{level}_up")(x)
        x = layers.Concatenate(name=f"{name}_dec{level}_concat")([x, *(s[level - 1] for s in skip_sets)])
        x = se_block(x, filters[level - 1], f"{name}_dec{level}")
    return x


def build_doubleunet(n_classes: int = 2, input_size: int = 1024, width: float = 1.0,
                     aspp_filters: int = ASPP_FILTERS, deep_supervision: bool = False) -> keras.Model:
    """DoubleU-Net: inputs ``image`` (S, S, 3) and ``heatmap`` (S, S, 1) ->
    ``segmentation`` (S, S, n_classes) softmax [+ ``first_unet`` with
    ``deep_supervision``].  ``input_size`` S: a multiple of 256; ``width`` scales every
    filter count, ASPP's included."""
    name = "doubleunet"
    n_classes = check_n_classes(n_classes, name)
    check_positive(aspp_filters, "aspp_filters", name)
    *filters, aspp_width = scaled_filters((*DOUBLEUNET_FILTERS, aspp_filters), width, name)
    input_size = check_input_size(input_size, len(filters), name)
    inputs, x_in = refinement_inputs(input_size)

    x, skips1 = _encoder(x_in, filters, "net1")
    x = aspp(x, aspp_width, "net1_aspp", dropout=DROPOUT)
    x = _decoder(x, filters, [skips1], "net1")
    first = softmax_head(x, n_classes, "first_unet")

    x = layers.Concatenate(name="net2_input")([x_in, first])
    x, skips2 = _encoder(x, filters, "net2")
    x = aspp(x, aspp_width, "net2_aspp", dropout=DROPOUT)
    x = _decoder(x, filters, [skips1, skips2], "net2")
    outputs = softmax_head(x, n_classes, "segmentation")
    if deep_supervision:
        outputs = [outputs, first]
    return keras.Model(inputs, outputs, name=name)
