"""Every architecture of the paper as a Keras 3 functional-model builder.

``build(name, **kw)`` looks ``name`` up in :data:`ARCHITECTURES`:

=============  ===========================================  ===========================
name           builder (keyword arguments)                   model
=============  ===========================================  ===========================
mobilenetv2    n_classes, input_size=256, alpha, weights     ``image`` -> ``classification``
inceptionv3    n_classes, input_size=256, width, weights     ``image`` -> ``classification``
unet           n_classes, input_size=1024, width             ``image``, ``heatmap`` -> ``segmentation``
unet_lr        n_classes, input_size=1024, width             ``image`` -> ``segmentation``
agunet         ... , deep_supervision                        ``image``, ``heatmap`` -> ``segmentation``
dagunet        ... , deep_supervision                        ``image``, ``heatmap`` -> ``segmentation``
doubleunet     ... , aspp_filters, deep_supervision          ``image``, ``heatmap`` -> ``segmentation``
dsmn_s2        n_classes=6, input_size=256, width            ``x20`` -> ``segmentation``
dmmn_ms        n_classes=6, input_size=256, width            ``x20``, ``x10``, ``x5`` -> ``segmentation``
dmmn_m2s       n_classes=6, input_size=256, width            ``x20``, ``x10``, ``x5`` -> ``segmentation``
dmmn_m3        n_classes=6, input_size=256, width            ``x20``, ``x10``, ``x5`` -> ``segmentation``
unet_effnet    n_classes=3, input_size=512, encoder, weights   ``x_hi`` -> ``segmentation``
munet          ... , ratio, decoder_width                    ``x_hi``, ``x_lo`` -> ``segmentation``, ``high``, ``low``
resnet18_fcn   n_classes, input_size=256, width              ``image`` -> ``segmentation`` (RAZN)
razn_policy    input_size=256, width                         ``image`` -> ``zoom`` (B, 1)
=============  ===========================================  ===========================

Classifiers map (B, S, S, 3) float32 in [0, 1] to (B, n_classes) softmax; refinement
nets map ``image`` (B, S, S, 3) and ``heatmap`` (B, S, S, 1) to (B, S, S, n_classes)
softmax; DMMN's networks (Ho et al., :mod:`h2g.models.dmmn`) map co-centred views
``x20``, ``x10``, ``x5`` (B, S, S, 3) of one point at 20x, 10x and 5x (DSMN-S2: ``x20``
only) to (B, S, S, n_classes) softmax on x20's grid.  Built with
``deep_supervision=True``, a model has further outputs (named in the builder's
docstring) for training; :func:`inference_model` keeps ``segmentation`` only.  Builders
use Keras' global random state: call ``keras.utils.set_random_seed`` first for
reproducible initial weights.  Importing this package builds nothing.
"""
from __future__ import annotations

import inspect

import keras

from h2g.core.errors import ConfigError
from h2g.models.agunet import build_agunet
from h2g.models.classifiers import build_inceptionv3, build_mobilenetv2
from h2g.models.dagunet import build_dagunet
from h2g.models.dmmn import build_dmmn_m2s, build_dmmn_m3, build_dmmn_ms, build_dsmn_s2
from h2g.models.doubleunet import build_doubleunet
from h2g.models.munet import build_munet, build_unet_effnet
from h2g.models.razn import build_policy, build_resnet18_fcn
from h2g.models.unet import build_unet, build_unet_lr

ARCHITECTURES = {
    "mobilenetv2": build_mobilenetv2,
    "inceptionv3": build_inceptionv3,
    "unet": build_unet,
    "unet_lr": build_unet_lr,
    "agunet": build_agunet,
    "dagunet": build_dagunet,
    "doubleunet": build_doubleunet,
    "dsmn_s2": build_dsmn_s2,
    "dmmn_ms": build_dmmn_ms,
    "dmmn_m2s": build_dmmn_m2s,
    "dmmn_m3": build_dmmn_m3,
    "unet_effnet": build_unet_effnet,
    "munet": build_munet,
    "resnet18_fcn": build_resnet18_fcn,
    "razn_policy": build_policy,
}

# Section 3.2's parameter counts.  The paper gives none for UNet-LR (design II), the
# U-Net on the image alone; it has 72 weights fewer than "unet".
PAPER_PARAMS = {
    "mobilenetv2": 2_390_000,
    "inceptionv3": 22_000_000,
    "unet": 11_580_000,
    "agunet": 7_680_000,
    "dagunet": 9_990_000,
    "doubleunet": 16_040_000,
}

CLASSIFIERS = ("mobilenetv2", "inceptionv3")
INFERENCE_OUTPUT = "segmentation"


def build(name: str, **kw) -> keras.Model:
    """Build architecture ``name`` with the builder's keyword arguments ``kw``.
    An unknown name or argument is a :class:`ConfigError`."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ConfigError(f"{name} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return builder(**kw)


def inference_model(model: keras.Model) -> keras.Model:
    """The single-output model of a refinement net built with deep supervision: same
    layers and weights, output ``segmentation`` only.  A single-output model is
    returned unchanged."""
    if len(model.outputs) == 1:
        return model
    try:
        output = model.get_layer(INFERENCE_OUTPUT).output
    except ValueError:
        raise ConfigError(f"model {model.name!r} has several outputs and none is called {INFERENCE_OUTPUT!r}") from None
    return keras.Model(model.inputs, output, name=model.name)


def batchnorm_layers(model: keras.Model) -> list:
    """Every BatchNormalization layer of ``model``, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(batchnorm_layers(layer))
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Set the moving-average momentum of every BatchNormalization layer in ``model``
    (nested models included); returns how many were changed.  Call before compiling."""
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)
