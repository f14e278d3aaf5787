"""RAZN's networks (Dong et al., ``../shared/paper/razn.txt``, Section 2 and 3): the
dilated ResNet18 segmentation FCN, the policy network, and the units every RAZN design
runs on one region (Scale 1, Scale 2, MS, Attention).

Segmentation FCN (:func:`build_resnet18_fcn`): ResNet18 (He et al. 2016; Keras
applications have none) with no downsampling in ``conv3_1`` and ``conv4_1`` (the paper's
Implementation), dilation instead so each stage keeps the field of view it has in the
original:

====================  ======  =========  ===========  =======================
stage                 blocks  filters    first stride dilation (output stride)
====================  ======  =========  ===========  =======================
conv1 7x7 + max pool  -       64         2, pool 2    1 (4)
conv2_x               2       64         1            1 (4)
conv3_x               2       128        **1**        2 (4)
conv4_x               2       256        **1**        4 (4)
conv5_x               2       512        2            2 (8)
====================  ======  =========  ===========  =======================

(filters times ``width``).  ``conv5_1`` keeps ResNet18's stride 2 (its first 3x3
convolution and its 1x1 projection: Keras convolutions cannot be strided and dilated
at once), so the output stride is 8: a 1x1 convolution to the classes, bilinear
upsampling x8 back to the input size and a per-pixel softmax (layer ``segmentation``).
Basic blocks: 3x3 conv-BN-ReLU, 3x3 conv-BN, identity (or 1x1 conv-BN projection when
the shape changes) added, ReLU.

Policy network (:func:`build_policy`): ResNet18's layout with each stage (two residual
blocks) replaced by one 3x3 convolution + BN + ReLU (strides 1, 2, 2, 2 as in ResNet18),
global average pooling and one logit; its output ``zoom`` is ``p = sigmoid(logit)``, the
probability of the zoom-in action (Eq. 2).  Its cost relative to the segmentation
network is :func:`relative_cost` (the paper: 7.1 %).

Zoom geometry (m = 1, r = 2).  A region is ``x0``: S x S px at magnification m0.  Its
zoom ``x1`` is the same field read at ``r * m0``: rS x rS px, cut into r^2 patches of
S x S (:func:`split_zoom`, quadrant (i, j) at batch index ``b * r^2 + i * r + j``), each
segmented by the fine network; the predictions are put back in place
(:func:`stitch_zoom`).  Everything is compared on the fine grid (rS px a side): a
coarse prediction of S px is enlarged by nearest-neighbour upsampling, so coarse pixel
(u, v) covers fine pixels (r u .. r u + r - 1, r v .. r v + r - 1), exactly its field.

Units (``unit_model``): the single Keras model a baseline design runs per region, from
the views ``x0`` (S px at m0) and/or ``x1`` (rS px at r m0) to (B, rS, rS, C) softmax on
the fine grid:

- ``scale1``: the FCN on ``x0``, upsampled;
- ``scale2``: the FCN on the r^2 patches of ``x1``, stitched;
- ``ms``: one FCN on both (shared weights), the two predictions averaged;
- ``attention``: one FCN on both, fused with learned per-pixel scale weights (Chen et
  al. 2016, "attention to scale"): a small head (3x3 conv ReLU, 1x1 conv to 2, softmax
  over scales) on the two scales' log-probabilities gives ``w_s``, the output is
  ``sum_s w_s P_s``.  (Chen et al. feed the head the FCN's penultimate features; the
  score maps keep the unit one FCN with one output.)

TensorFlow / Keras; numpy twins of the geometry live in :mod:`h2g.inference.zoom`.
"""
from __future__ import annotations

import keras
from keras import layers, ops

from h2g.core.errors import ConfigError

ZOOM_RATE = 2
STAGES = (  # name, filters, first stride, dilation (ResNet18 with conv3_1 and conv4_1 undownsampled)
    ("conv2", 64, 1, 1),
    ("conv3", 128, 1, 2),
    ("conv4", 256, 1, 4),
    ("conv5", 512, 2, 2),
)
OUTPUT_STRIDE = 8
UNITS = ("scale1", "scale2", "ms", "attention")


def _filters(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def _conv_bn(x, filters, kernel, name, stride=1, dilation=1, relu=True):
    x = layers.Conv2D(filters, kernel, strides=stride, dilation_rate=dilation, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, name, stride=1, dilation=1):
    shortcut = x
    y = _conv_bn(x, filters, 3, f"{name}_1", stride=stride, dilation=1 if stride > 1 else dilation)
    y = _conv_bn(y, filters, 3, f"{name}_2", dilation=dilation, relu=False)
    if stride > 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, f"{name}_proj", stride=stride, relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def _stem(x, width, prefix=""):
    x = _conv_bn(x, _filters(64, width), 7, f"{prefix}conv1", stride=2)
    return layers.MaxPooling2D(3, strides=2, padding="same", name=f"{prefix}pool1")(x)


def build_resnet18_fcn(n_classes: int, input_size: int = 256, width: float = 1.0,
                       name: str = "resnet18_fcn") -> keras.Model:
    """The dilated ResNet18 FCN (module doc): ``image`` (B, S, S, 3) -> ``segmentation``
    (B, S, S, n_classes) softmax.  ``input_size`` must be a multiple of 8."""
    if n_classes < 2 or input_size % OUTPUT_STRIDE:
        raise ConfigError(f"resnet18_fcn: n_classes must be >= 2 and input_size a multiple of {OUTPUT_STRIDE}, "
                          f"got {n_classes} and {input_size}")
    image = keras.Input((input_size, input_size, 3), name="image")
    x = _stem(image, width)
    for stage, filters, stride, dilation in STAGES:
        x = _basic_block(x, _filters(filters, width), f"{stage}_1", stride=stride, dilation=dilation)
        x = _basic_block(x, _filters(filters, width), f"{stage}_2", dilation=dilation)
    x = layers.Conv2D(n_classes, 1, kernel_initializer="he_normal", name="classifier")(x)
    x = layers.UpSampling2D(OUTPUT_STRIDE, interpolation="bilinear", name="upsample")(x)
    out = layers.Softmax(name="segmentation")(x)
    return keras.Model(image, out, name=name)


def build_policy(input_size: int = 256, width: float = 1.0, name: str = "policy") -> keras.Model:
    """The policy network (module doc): ``image`` (B, S, S, 3) -> ``zoom`` (B, 1), the
    probability ``p`` of zooming in."""
    image = keras.Input((input_size, input_size, 3), name="image")
    x = _stem(image, width, prefix="policy_")
    for i, (filters, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=2):
        x = _conv_bn(x, _filters(filters, width), 3, f"policy_conv{i}", stride=stride)
    x = layers.GlobalAveragePooling2D(name="policy_pool")(x)
    logit = layers.Dense(1, name="policy_logit")(x)
    return keras.Model(image, layers.Activation("sigmoid", name="zoom")(logit), name=name)


def build_razn_networks(n_classes: int, input_size: int = 256, width: float = 1.0, seed: int = 0) -> dict:
    """RAZN's ``policy``, ``coarse`` and ``fine`` networks.  Each is built right after
    ``keras.utils.set_random_seed(seed)``, so the coarse and the fine FCN start from the
    weights a baseline's FCN (Scale 1's, Scale 2's) starts from with the same seed: at
    equal training they are those baselines' networks, and RAZN's comparison with them
    is one of the policy's decisions, not of initial weights."""
    keras.utils.set_random_seed(seed)
    policy = build_policy(input_size, width)
    nets = {"policy": policy}
    for role in ("coarse", "fine"):
        keras.utils.set_random_seed(seed)
        nets[role] = build_resnet18_fcn(n_classes, input_size, width, name=role)
    return nets


# --------------------------------------------------------------------------------------
# Zoom geometry in Keras (numpy twins: h2g.inference.zoom)
# --------------------------------------------------------------------------------------
def split_zoom(x, rate: int = ZOOM_RATE):
    """(B, rS, rS, C) -> (B r^2, S, S, C): quadrant (i, j) of sample b at ``b r^2 + i r + j``."""
    size, channels = x.shape[1] // rate, x.shape[-1]
    x = ops.reshape(x, (-1, rate, size, rate, size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, size, size, channels))


def stitch_zoom(x, rate: int = ZOOM_RATE):
    """The inverse of :func:`split_zoom`: (B r^2, S, S, C) -> (B, rS, rS, C)."""
    size, channels = x.shape[1], x.shape[-1]
    x = ops.reshape(x, (-1, rate, rate, size, size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, rate * size, rate * size, channels))


def enlarge(x, rate: int = ZOOM_RATE):
    """Coarse (B, S, S, C) -> fine grid (B, rS, rS, C), nearest neighbour."""
    return ops.repeat(ops.repeat(x, rate, axis=1), rate, axis=2)


@keras.saving.register_keras_serializable(package="h2g")
class SplitZoom(layers.Layer):
    def __init__(self, rate: int = ZOOM_RATE, **kw):
        super().__init__(**kw)
        self.rate = rate

    def call(self, x):
        return split_zoom(x, self.rate)

    def compute_output_shape(self, shape):
        return (None if shape[0] is None else shape[0] * self.rate ** 2, shape[1] // self.rate,
                shape[2] // self.rate, shape[3])

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package="h2g")
class StitchZoom(SplitZoom):
    def call(self, x):
        return stitch_zoom(x, self.rate)

    def compute_output_shape(self, shape):
        return (None if shape[0] is None else shape[0] // self.rate ** 2, shape[1] * self.rate,
                shape[2] * self.rate, shape[3])


@keras.saving.register_keras_serializable(package="h2g")
class Enlarge(SplitZoom):
    def call(self, x):
        return enlarge(x, self.rate)

    def compute_output_shape(self, shape):
        return (shape[0], shape[1] * self.rate, shape[2] * self.rate, shape[3])


@keras.saving.register_keras_serializable(package="h2g")
class LogProbs(layers.Layer):
    """``log(clip(p, 1e-7, 1))``."""

    def call(self, p):
        return ops.log(ops.clip(p, 1e-7, 1.0))


@keras.saving.register_keras_serializable(package="h2g")
class ScaleFusion(layers.Layer):
    """``w[..., 0:1] * coarse + w[..., 1:2] * fine``: the attention-weighted sum of two scales."""

    def call(self, inputs):
        coarse, fine, weights = inputs
        return coarse * weights[..., :1] + fine * weights[..., 1:]

    def compute_output_shape(self, shapes):
        return shapes[0]


def unit_model(unit: str, fcn: keras.Model, attention_width: int = 16) -> keras.Model:
    """A baseline's per-region model around the FCN ``fcn`` (module doc): inputs ``x0``
    and / or ``x1``, output ``segmentation`` (B, rS, rS, C) on the fine grid."""
    if unit not in UNITS:
        raise ConfigError(f"unknown RAZN unit {unit!r}; choose from {', '.join(UNITS)}")
    size = fcn.inputs[0].shape[1]
    x0 = keras.Input((size, size, 3), name="x0")
    x1 = keras.Input((ZOOM_RATE * size, ZOOM_RATE * size, 3), name="x1")
    coarse = Enlarge(name="enlarge")(fcn(x0)) if unit != "scale2" else None
    fine = StitchZoom(name="stitch")(fcn(SplitZoom(name="split")(x1))) if unit != "scale1" else None
    if unit == "scale1":
        return keras.Model(x0, layers.Identity(name="segmentation")(coarse), name="razn_scale1")
    if unit == "scale2":
        return keras.Model(x1, layers.Identity(name="segmentation")(fine), name="razn_scale2")
    if unit == "ms":
        out = layers.Average(name="segmentation")([coarse, fine])
        return keras.Model({"x0": x0, "x1": x1}, out, name="razn_ms")
    logs = [LogProbs(name=f"log_{s}")(p) for s, p in (("coarse", coarse), ("fine", fine))]
    h = layers.Concatenate(name="att_in")(logs)
    h = layers.Conv2D(attention_width, 3, padding="same", activation="relu", name="att_conv")(h)
    weights = layers.Softmax(name="att_weights")(layers.Conv2D(2, 1, name="att_logits")(h))
    fused = ScaleFusion(name="segmentation")([coarse, fine, weights])
    return keras.Model({"x0": x0, "x1": x1}, fused, name="razn_attention")


# --------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------
def _layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of ``model``'s convolutions and dense layers for one sample
    (each layer counted once, at the output shape of its first call)."""
    total = 0
    for layer in _layers(model):
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * layer.kernel.shape[2] * c_out
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def relative_cost(input_size: int = 256, width: float = 1.0, n_classes: int = 4) -> float:
    """FLOPs of the policy network / FLOPs of the segmentation FCN (the paper: 0.071)."""
    return flops(build_policy(input_size, width)) / flops(build_resnet18_fcn(n_classes, input_size, width))
