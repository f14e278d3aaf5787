"""Deep Multi-Magnification Networks (Ho et al., Section II-D and Fig. 4): DSMN-S2,
DMMN-MS, DMMN-M2S and DMMN-M3.

Inputs are named after the magnification they are read at: ``x20`` (the target patch,
S x S px at 20x), ``x10`` (S x S px at 10x: twice the field, its centre S/2 px is x20's
field) and ``x5`` (S x S px at 5x: four times the field, its centre S/4 px is x20's
field), each (B, S, S, 3) float32 in [0, 1] and centred on the same point.  The single
output ``segmentation`` is (B, S, S, n_classes) softmax on x20's pixel grid.

Building blocks, as in the authors' release (U-Net with half the channels):

- filters 32-64-128-256-512 times ``width`` (at least one each), five levels: four
  encoder blocks each followed by 2x2 max pooling, and the bottleneck block;
- CONV_BLOCK: (3x3 convolution, "same" padding -> ReLU) x 2; no batch normalisation;
- CONV_TR_2: 3x3 transposed convolution with stride 2 ("same" padding) -> ReLU
  (CONV_TR_4: two CONV_TR_2 in series); a decoder step is CONV_TR_2 to the next level's
  filters, concatenation with the encoder skip connection, CONV_BLOCK;
- CONV_FINAL: 3x3 convolution (first level's filters) -> ReLU -> 1x1 convolution to
  ``n_classes``, then softmax (the layer ``segmentation``);
- every kernel is initialised Kaiming-normal (``he_normal``), biases zero.

Geometry.  At depth d (0 = input resolution, 4 = bottleneck) a view's feature map has
S / 2**d px; a pixel of the x20 map spans 2**d px at 20x, of the x10 map 2**(d+1), of
the x5 map 2**(d+2).  The red "center-crop" arrows of Fig. 4 keep the centre 1/2 (x10) or
1/4 (x5) of a map, which is exactly x20's field (``keras.layers.Cropping2D``).  Scales
then match in two ways: the x10 map one level shallower (d - 1), or the x5 map two levels
shallower (d - 2), has the pixel size of the x20 map at depth d, so the crop is already
its size (M3); or a crop at the same depth is enlarged 2x / 4x (MS, M2S).  The 3x3
stride-2 "same" transposed convolution spreads input pixel i over output pixels 2i..2i+2:
its footprint 2i, 2i+1 and one pixel beyond (PyTorch's padding 1, output padding 1 in the
release: one pixel before), which a learnt kernel may use or not; the crops themselves
are exact.

Wiring (``enc{l}``/``dec{l}``: the encoder / decoder block at depth l - 1, S / 2**(l-1)
px; ``bottleneck``: depth 4; layer names start with the view, e.g. ``x10_dec3``):

- **DSMN-S2** (:func:`build_dsmn_s2`): one U-Net on ``x20``.
- **DMMN-MS** (:func:`build_dmmn_ms`): three encoders, one decoder (x20's).  Each x10 /
  x5 encoder map at depth d (the blocks ``enc1``..``enc4`` and ``bottleneck``) is
  centre-cropped to x20's field and enlarged by nearest-neighbour upsampling x2 / x4 to
  the x20 map's size and scale at the same depth (parameter-free: every x20-grid pixel
  gets the features of the context pixel that contains it).  The bottleneck context is
  concatenated with x20's bottleneck before the first CONV_TR_2; at every decoder step
  the context of ``enc{l}`` joins x20's skip connection ``enc{l}``, so the decoder
  concatenates [x20 enc{l}, x10 enc{l}, x5 enc{l}, upsampled decoder].  (Where a crop
  boundary falls inside a pixel - the deepest maps when S is not a multiple of 128 - the
  map is cropped to whole pixels, upsampled, then cropped again: the same result as an
  exact crop, still nearest-neighbour.)
- **DMMN-M2S** (:func:`build_dmmn_m2s`): three U-Nets joined at the end: the last x10
  and x5 decoder maps (``dec1``, S px, first level's filters) are centre-cropped to S/2
  and S/4 px, brought back to S px by CONV_TR_2 / CONV_TR_4, concatenated with x20's
  ``dec1``, then CONV_FINAL.
- **DMMN-M3** (:func:`build_dmmn_m3`): three U-Nets; before each CONV_TR_2 of the x20
  decoder, centre crops (no upsampling) of the x10 and x5 decoder maps of the same pixel
  size are concatenated with the x20 map:

  ==========================  ==============================  ===============================
  x20 input of the step       x10 map, crop centre 1/2        x5 map, crop centre 1/4
  ==========================  ==============================  ===============================
  bottleneck (S/16)           x10 ``dec4`` (S/8 -> S/16)      x5 ``dec3`` (S/4 -> S/16)
  ``dec4`` (S/8)              x10 ``dec3`` (S/4 -> S/8)       x5 ``dec2`` (S/2 -> S/8)
  ``dec3`` (S/4)              x10 ``dec2`` (S/2 -> S/4)       x5 ``dec1`` (S -> S/4)
  ``dec2`` (S/2)              x10 ``dec1`` (S -> S/2)         (none: it would be finer than S)
  ==========================  ==============================  ===============================

  The x10 / x5 U-Nets have no head of their own; all their decoder blocks feed x20's.

``input_size`` S must be a multiple of 16 (four poolings), and of 32 for MS and M3,
whose deepest crops take the centre half of an S/16 or S/8 px map.
"""
from __future__ import annotations

import keras
from keras import layers

from h2g.core.errors import ConfigError
from h2g.models.blocks import check_input_size, check_n_classes, check_positive

DMMN_FILTERS = (32, 64, 128, 256, 512)
VIEWS = ("x20", "x10", "x5")
ZOOM = {"x20": 1, "x10": 2, "x5": 4}  # field of view relative to x20
POOLINGS = len(DMMN_FILTERS) - 1
INIT = "he_normal"


# --------------------------------------------------------------------------- checks
def dmmn_filters(width: float, arch: str) -> list[int]:
    """The authors' 32-64-128-256-512 filters times ``width``, rounded, at least one."""
    check_positive(width, "width", arch)
    return [max(1, int(round(f * width))) for f in DMMN_FILTERS]


def _check_size(input_size: int, arch: str, multiple: int = 2**POOLINGS) -> int:
    size = check_input_size(input_size, POOLINGS, arch)
    if size % multiple:
        raise ConfigError(f"{arch}: input_size must be a multiple of {multiple} (so that the centre crops of "
                          f"its deepest 10x and 5x maps are whole pixels), got {input_size!r}")
    return size


def _inputs(input_size: int, views=VIEWS) -> dict:
    return {v: keras.Input((input_size, input_size, 3), name=v) for v in views}


# --------------------------------------------------------------------------- blocks
def _conv(x, filters: int, name: str, kernel_size: int = 3):
    return layers.Conv2D(filters, kernel_size, padding="same", activation="relu",
                         kernel_initializer=INIT, name=name)(x)


def _conv_block(x, filters: int, name: str):
    """CONV_BLOCK: (3x3 convolution -> ReLU) x 2."""
    return _conv(_conv(x, filters, f"{name}_1"), filters, f"{name}_2")


def _conv_tr(x, filters: int, name: str):
    """CONV_TR_2: 3x3 stride-2 transposed convolution -> ReLU (doubles the side)."""
    return layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu",
                                  kernel_initializer=INIT, name=name)(x)


def _head(x, filters: int, n_classes: int):
    """CONV_FINAL and the softmax ``segmentation``."""
    x = _conv(x, filters, "final_conv")
    x = layers.Conv2D(n_classes, 1, kernel_initializer=INIT, name="segmentation_logits")(x)
    return layers.Softmax(axis=-1, name="segmentation")(x)


def _side(x) -> int:
    height, width = x.shape[1], x.shape[2]
    if height != width:
        raise ConfigError(f"square feature maps expected, got {height}x{width}")
    return int(height)


def centre_crop(x, factor: int, name: str):
    """The centre 1/``factor`` of ``x``'s side (the red center-crop arrows of Fig. 4)."""
    n = _side(x)
    keep, rest = divmod(n, factor)
    if rest or (n - keep) % 2:
        raise ConfigError(f"{name}: cannot take the centre 1/{factor} of a {n} px map")
    margin = (n - keep) // 2
    return layers.Cropping2D(margin, name=name)(x)


def centre_enlarge(x, factor: int, name: str):
    """The centre 1/``factor`` of ``x`` enlarged ``factor`` times back to ``x``'s size by
    nearest-neighbour upsampling.  When the crop boundary falls inside a pixel, ``x`` is
    cropped to whole pixels, upsampled, and cropped again (same result, exact field)."""
    n = _side(x)
    excess = n * (factor - 1)  # side of the upsampled map minus n, in output pixels
    if excess % 2:
        raise ConfigError(f"{name}: cannot take the centre 1/{factor} of a {n} px map")
    before = excess // (2 * factor)  # whole input pixels outside the field, each side
    if before:
        x = layers.Cropping2D(before, name=f"{name}_crop")(x)
    x = layers.UpSampling2D(factor, interpolation="nearest", name=f"{name}_up")(x)
    after = excess // 2 - before * factor
    if after:
        x = layers.Cropping2D(after, name=f"{name}_trim")(x)
    return x


def _encoder(x, filters, view: str):
    """Four CONV_BLOCKs with max pooling and the bottleneck block.  Returns
    ``(bottleneck, skips)``, ``skips[l - 1]`` being ``enc{l}`` (S / 2**(l-1) px)."""
    skips = []
    for level, f in enumerate(filters[:-1], start=1):
        x = _conv_block(x, f, f"{view}_enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"{view}_enc{level}_pool")(x)
    return _conv_block(x, filters[-1], f"{view}_bottleneck"), skips


def _decoder(x, skips, filters, view: str, before_up=None, skip_extra=None):
    """The U-Net decoder from ``x`` (the bottleneck).  The step to ``dec{l}`` concatenates
    ``before_up[l]`` (tensors at ``x``'s size) to its input before CONV_TR_2 and
    ``skip_extra[l]`` to the skip connection ``enc{l}``.  Returns ``{l: dec{l}}``."""
    before_up, skip_extra = before_up or {}, skip_extra or {}
    decoded = {}
    for level in range(len(skips), 0, -1):
        if before_up.get(level):
            x = layers.Concatenate(name=f"{view}_dec{level}_join")([x, *before_up[level]])
        up = _conv_tr(x, filters[level - 1], f"{view}_dec{level}_up")
        x = layers.Concatenate(name=f"{view}_dec{level}_concat")([skips[level - 1], *skip_extra.get(level, ()), up])
        x = _conv_block(x, filters[level - 1], f"{view}_dec{level}")
        decoded[level] = x
    return decoded


def _unet(x, filters, view: str, before_up=None):
    bottleneck, skips = _encoder(x, filters, view)
    return _decoder(bottleneck, skips, filters, view, before_up=before_up)


def _model(inputs: dict, output, name: str) -> keras.Model:
    return keras.Model([inputs[v] for v in VIEWS if v in inputs], output, name=name)


# --------------------------------------------------------------------------- builders
def build_dsmn_s2(n_classes: int = 6, input_size: int = 256, width: float = 1.0) -> keras.Model:
    """DSMN-S2: one U-Net on ``x20`` (S, S, 3) -> ``segmentation`` (S, S, n_classes).
    ``input_size`` S: a multiple of 16; ``width`` scales the 32..512 filters."""
    arch = "dsmn_s2"
    n_classes = check_n_classes(n_classes, arch)
    filters = dmmn_filters(width, arch)
    inputs = _inputs(_check_size(input_size, arch), ("x20",))
    decoded = _unet(inputs["x20"], filters, "x20")
    return _model(inputs, _head(decoded[1], filters[0], n_classes), arch)


def build_dmmn_ms(n_classes: int = 6, input_size: int = 256, width: float = 1.0) -> keras.Model:
    """DMMN-MS: x20, x10 and x5 encoders, x20's decoder.  Every x10 / x5 encoder map is
    centre-cropped to x20's field and enlarged (nearest, x2 / x4) to the x20 map of the
    same depth; the bottleneck context joins x20's bottleneck, that of ``enc{l}`` joins
    the skip connection ``enc{l}`` (see the module doc).  S: a multiple of 32."""
    arch = "dmmn_ms"
    n_classes = check_n_classes(n_classes, arch)
    filters = dmmn_filters(width, arch)
    inputs = _inputs(_check_size(input_size, arch, 32))
    bottleneck, skips = _encoder(inputs["x20"], filters, "x20")
    before_up = {len(skips): []}
    skip_extra = {level: [] for level in range(1, len(skips) + 1)}
    for view in ("x10", "x5"):
        deep, context = _encoder(inputs[view], filters, view)
        before_up[len(skips)].append(centre_enlarge(deep, ZOOM[view], f"{view}_bottleneck_field"))
        for level, skip in enumerate(context, start=1):
            skip_extra[level].append(centre_enlarge(skip, ZOOM[view], f"{view}_enc{level}_field"))
    decoded = _decoder(bottleneck, skips, filters, "x20", before_up=before_up, skip_extra=skip_extra)
    return _model(inputs, _head(decoded[1], filters[0], n_classes), arch)


def build_dmmn_m2s(n_classes: int = 6, input_size: int = 256, width: float = 1.0) -> keras.Model:
    """DMMN-M2S: three U-Nets; the last x10 / x5 decoder maps, centre-cropped to x20's
    field (S/2, S/4 px) and upsampled by CONV_TR_2 / CONV_TR_4 to S px, are concatenated
    with x20's, then CONV_FINAL.  S: a multiple of 16."""
    arch = "dmmn_m2s"
    n_classes = check_n_classes(n_classes, arch)
    filters = dmmn_filters(width, arch)
    inputs = _inputs(_check_size(input_size, arch))
    joined = [_unet(inputs["x20"], filters, "x20")[1]]
    for view in ("x10", "x5"):
        x = centre_crop(_unet(inputs[view], filters, view)[1], ZOOM[view], f"{view}_field")
        for step in range(1, ZOOM[view].bit_length()):  # log2(zoom) CONV_TR_2s
            x = _conv_tr(x, filters[0], f"{view}_field_up{step}")
        joined.append(x)
    x = layers.Concatenate(name="views_concat")(joined)
    return _model(inputs, _head(x, filters[0], n_classes), arch)


def build_dmmn_m3(n_classes: int = 6, input_size: int = 256, width: float = 1.0) -> keras.Model:
    """DMMN-M3: three U-Nets; centre crops of the x10 decoder maps one level shallower and
    of the x5 maps two levels shallower (same pixel size, x20's field) are concatenated
    into x20's decoder before each CONV_TR_2 (table in the module doc).  S: a multiple
    of 32."""
    arch = "dmmn_m3"
    n_classes = check_n_classes(n_classes, arch)
    filters = dmmn_filters(width, arch)
    inputs = _inputs(_check_size(input_size, arch, 32))
    context = {view: _unet(inputs[view], filters, view) for view in ("x10", "x5")}
    depth = len(filters) - 1
    before_up = {}
    for level in range(depth, 0, -1):  # the step from depth `level` to dec{level}
        joins = [centre_crop(context["x10"][level], 2, f"x10_dec{level}_field")]
        if level - 1 >= 1:
            joins.append(centre_crop(context["x5"][level - 1], 4, f"x5_dec{level - 1}_field"))
        before_up[level] = joins
    decoded = _unet(inputs["x20"], filters, "x20", before_up=before_up)
    return _model(inputs, _head(decoded[1], filters[0], n_classes), arch)
