"""Losses: the cluster-weighted categorical cross-entropy (CWCE, paper Section 2.4) with
the training wrapper that feeds it cluster ids, and a soft Dice loss for refinement nets.

CWCE in ``model.fit``: Keras losses see only ``(y_true, y_pred)``, so the cluster ids
travel inside ``y_pred``.  :func:`cluster_guided` wraps a classifier and a frozen cluster
model (:mod:`h2g.training.clustering`) into a :class:`ClusterGuided` model whose output packs
``[class probabilities (B, C), one-hot cluster (B, K)]`` into one ``(B, C + K)`` tensor
(the cluster branch is frozen and behind ``stop_gradient``); :class:`CWCELoss` unpacks
it.  The trainable variables of the wrapper are exactly the classifier's, so optimiser
state and gradient accumulation are unaffected, and :func:`unwrap_classifier` gives the
plain classifier back for saving, inference and export.  Importing this module imports
:mod:`h2g.training.clustering`, which registers the cluster layers, so saved cluster models and
wrappers load with ``keras.models.load_model``.

The paper does not name the loss of its refinement networks; the package offers plain
categorical cross-entropy (Keras' own) and :func:`dice_loss`.

DMMN (Ho et al.) trains on partial annotations with :func:`weighted_crossentropy`
(:class:`WeightedCrossEntropy`): class weights ``w_c = 1 - N_c / sum N``
(:func:`class_weights_from_counts`), unannotated pixels weighted 0.
"""
from __future__ import annotations

import keras
from keras import ops

from h2g.core.errors import ModelError
from h2g.training.clustering import n_clusters_of

#: Probabilities are clipped to [EPSILON, 1 - EPSILON] before the logarithm.
EPSILON = 1e-7


def _cwce(y_true, y_pred, membership, normalise: bool, epsilon: float):
    """CWCE from one-hot cluster membership ``(B, K)``; see :func:`cwce`."""
    y_true = ops.cast(y_true, y_pred.dtype)
    membership = ops.cast(membership, y_pred.dtype)
    probs = ops.clip(y_pred, epsilon, 1.0 - epsilon)
    sample_ce = -ops.sum(y_true * ops.log(probs), axis=-1)                       # (B,)
    cluster_ce = ops.sum(membership * ops.expand_dims(sample_ce, -1), axis=0)   # (K,)
    counts = ops.sum(membership, axis=0)                                         # (K,)
    if normalise:
        cluster_ce = cluster_ce / ops.maximum(counts, 1.0)
    n_present = ops.sum(ops.cast(counts > 0, y_pred.dtype))
    return ops.sum(cluster_ce) / ops.maximum(n_present, 1.0)


def cwce(y_true, y_pred, clusters, n_clusters: int, *, normalise: bool = True,
         epsilon: float = EPSILON):
    """Cluster-weighted categorical cross-entropy of one mini-batch (a scalar).

    ``y_true`` one-hot ``(B, C)``, ``y_pred`` probabilities ``(B, C)``, ``clusters`` int
    ids ``(B,)`` in ``[0, n_clusters)``.  With ``normalise=True`` (default, the text's
    "cross-entropy for each cluster independently, then the macro average"):

        L = 1/K_b * sum_{k present} [ 1/n_k * sum_{i in k} -sum_c y_ic log p_ic ]

    where K_b is the number of clusters present in the batch and n_k the size of cluster
    k.  ``normalise=False`` is Eq. (1) as printed (no 1/n_k), which equals
    ``B / K_b`` times the batch-mean cross-entropy.  Probabilities are clipped to
    ``[epsilon, 1 - epsilon]``; absent clusters contribute nothing, so the value is
    finite for any batch (0 for an empty one).  Ids outside ``[0, n_clusters)`` have an
    all-zero one-hot row: such samples are left out.
    """
    membership = ops.one_hot(ops.cast(clusters, "int32"), n_clusters, dtype=y_pred.dtype)
    return _cwce(y_true, y_pred, membership, normalise, epsilon)


@keras.saving.register_keras_serializable(package="h2g")
class CWCELoss(keras.losses.Loss):
    """CWCE for ``model.fit`` on a :class:`ClusterGuided` model: ``y_pred`` is the packed
    ``(B, n_classes + K)`` output, ``y_true`` one-hot ``(B, n_classes)``.  Per-batch: the
    value is not a mean of per-sample losses, so sample weights are not supported."""

    def __init__(self, n_classes: int = 2, normalise: bool = True, epsilon: float = EPSILON,
                 name: str = "cwce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes = int(n_classes)
        self.normalise = bool(normalise)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        if y_pred.shape[-1] is not None and y_pred.shape[-1] <= self.n_classes:
            raise ModelError(f"CWCELoss(n_classes={self.n_classes}) needs the packed output "
                             f"of a ClusterGuided model, got {y_pred.shape[-1]} columns")
        probs, membership = y_pred[:, :self.n_classes], y_pred[:, self.n_classes:]
        return _cwce(y_true, probs, membership, self.normalise, self.epsilon)

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes,
                "normalise": self.normalise, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="h2g")
class ClusterGuided(keras.Model):
    """Training wrapper: ``patches -> [classifier(patches), one_hot(cluster_model(patches))]``
    concatenated to ``(B, C + n_clusters)``.  The cluster model is frozen (its layers are
    not trainable and run in inference mode) and its output is behind ``stop_gradient``."""

    def __init__(self, classifier: keras.Model, cluster_model: keras.Model, n_clusters: int,
                 **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.cluster_model = cluster_model
        self.cluster_model.trainable = False
        self.n_clusters = int(n_clusters)

    def call(self, patches, training=None):
        probs = self.classifier(patches, training=training)
        ids = self.cluster_model(patches, training=False)
        one_hot = ops.stop_gradient(ops.one_hot(ops.cast(ids, "int32"), self.n_clusters,
                                                dtype=probs.dtype))
        return ops.concatenate([probs, one_hot], axis=-1)

    def get_config(self):
        return {**super().get_config(),
                "classifier": keras.saving.serialize_keras_object(self.classifier),
                "cluster_model": keras.saving.serialize_keras_object(self.cluster_model),
                "n_clusters": self.n_clusters}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["classifier"] = keras.saving.deserialize_keras_object(config["classifier"])
        config["cluster_model"] = keras.saving.deserialize_keras_object(config["cluster_model"])
        return cls(**config)


def cluster_guided(classifier: keras.Model, cluster_model: keras.Model,
                   n_clusters: int | None = None) -> ClusterGuided:
    """Wrap ``classifier`` (patches -> (B, C) probabilities) and a cluster model (patches
    -> (B,) int ids) for training with :class:`CWCELoss`.  ``n_clusters`` defaults to
    :func:`h2g.training.clustering.n_clusters_of` the cluster model."""
    if n_clusters is None:
        n_clusters = n_clusters_of(cluster_model)
        if n_clusters is None:
            raise ModelError(f"cluster model {cluster_model.name!r} has no layer with an "
                             f"n_clusters attribute; pass n_clusters")
    shape_c, shape_k = tuple(classifier.input_shape[1:]), tuple(cluster_model.input_shape[1:])
    if len(shape_c) != len(shape_k) or any(a and b and a != b for a, b in zip(shape_c, shape_k)):
        raise ModelError(f"classifier input {shape_c} does not match cluster model input {shape_k}")
    model = ClusterGuided(classifier, cluster_model, n_clusters, name="cluster_guided")
    model(keras.KerasTensor((None, *shape_c)))  # build
    return model


def unwrap_classifier(model: keras.Model) -> keras.Model:
    """The plain classifier of a :class:`ClusterGuided` model; any other model as is."""
    return model.classifier if isinstance(model, ClusterGuided) else model


@keras.saving.register_keras_serializable(package="h2g")
def dice_loss(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice loss per sample: ``1 - mean_c (2 sum y p + s) / (sum y + sum p + s)``,
    sums over every axis but the first (batch) and the last (classes), macro average
    over classes.  ``y_true`` one-hot, ``y_pred`` probabilities, both ``(B, ..., C)``;
    returns ``(B,)``.  ``smooth`` keeps absent classes finite (a class absent from both
    target and prediction scores 1)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(1, len(y_pred.shape) - 1))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - ops.mean(dice, axis=-1)


@keras.saving.register_keras_serializable(package="h2g")
def weighted_crossentropy(y_true, y_pred, class_weights, ignore: int = 255, epsilon: float = EPSILON):
    """Pixel-wise class-weighted cross-entropy with unannotated pixels weighted 0 (DMMN,
    Ho et al. Section II-E): per pixel ``w[y] * -log p[y]`` where the label ``y`` is a
    class, ``0`` where it is ``ignore``.

    ``y_true``: integer label maps ``(B, H, W)`` (class indices, ``ignore`` unannotated);
    ``y_pred``: probabilities ``(B, H, W, C)``; ``class_weights``: ``(C,)``.  Returns the
    per-pixel loss map ``(B, H, W)``; Keras' mean over it divides by every pixel,
    annotated or not, so a batch's loss is the weighted sum over its annotated pixels
    divided by ``B * H * W``.  An ignored pixel contributes no gradient."""
    n_classes = y_pred.shape[-1]
    weights = ops.convert_to_tensor(class_weights, dtype=y_pred.dtype)
    labels = ops.cast(y_true, "int32")
    annotated = ops.not_equal(labels, ignore)
    safe = ops.where(annotated, labels, ops.zeros_like(labels))
    onehot = ops.one_hot(safe, n_classes, dtype=y_pred.dtype)
    probs = ops.clip(y_pred, epsilon, 1.0 - epsilon)
    ce = -ops.sum(onehot * ops.log(probs), axis=-1)
    pixel_weight = ops.sum(onehot * weights, axis=-1) * ops.cast(annotated, y_pred.dtype)
    return pixel_weight * ce


@keras.saving.register_keras_serializable(package="h2g")
class WeightedCrossEntropy(keras.losses.Loss):
    """:func:`weighted_crossentropy` as a serialisable Keras loss (``class_weights`` a
    list of floats, one per class)."""

    def __init__(self, class_weights, ignore: int = 255, name: str = "weighted_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(w) for w in class_weights]
        self.ignore = int(ignore)

    def call(self, y_true, y_pred):
        return weighted_crossentropy(y_true, y_pred, self.class_weights, self.ignore)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights, "ignore": self.ignore}


def class_weights_from_counts(counts) -> "np.ndarray":
    """DMMN's class weights ``w_c = 1 - N_c / sum_k N_k`` from annotated pixel counts
    ``N_c`` (float32).  :class:`ModelError` when nothing is annotated."""
    import numpy as np

    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or counts.sum() <= 0:
        raise ModelError(f"class weights need annotated pixel counts per class, got {counts.tolist()}")
    return (1.0 - counts / counts.sum()).astype(np.float32)


# ---------------------------------------------------------------------- m-UNet
def normalised_weights(weights):
    """Class weights scaled to sum to 1 (the paper normalises them "so that the losses
    don't get scaled much")."""
    weights = ops.convert_to_tensor(weights)
    return weights / ops.maximum(ops.sum(weights), EPSILON)


@keras.saving.register_keras_serializable(package="h2g")
def dynamic_class_weights(y_true, n_classes: int, ignore: int = 255):
    """m-UNet's per-batch class weights (its Eq. 1): ``W_c = 1 - n_c / n`` with ``n_c`` the
    labelled pixels of class ``c`` in the batch and ``n`` all labelled pixels (``ignore``
    excluded), normalised to sum 1.  ``y_true`` integer label maps ``(B, H, W)``; returns
    ``(C,)`` float32.  A batch without labelled pixels gets uniform weights."""
    labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    annotated = ops.cast(ops.not_equal(labels, ignore), "float32")
    safe = ops.where(ops.not_equal(labels, ignore), labels, ops.zeros_like(labels))
    counts = ops.sum(ops.one_hot(safe, n_classes, dtype="float32") * annotated[:, None], axis=0)
    total = ops.sum(counts)
    weights = 1.0 - counts / ops.maximum(total, 1.0)
    return normalised_weights(weights)


@keras.saving.register_keras_serializable(package="h2g")
def weighted_ce_dice(y_true, y_pred, class_weights=None, ignore: int = 255, smooth: float = 1.0,
                     epsilon: float = EPSILON):
    """m-UNet's loss on one output (its Eqs. 5-6): weighted cross-entropy + weighted Dice
    over the batch's labelled pixels (label ``ignore``, e.g. a pseudo-label below the
    confidence threshold, counts nowhere: no loss, no gradient).

    ``WCE = sum_i W[y_i] (-log p_i[y_i]) / n`` over the ``n`` labelled pixels;
    ``WDL = 1 - sum_c W_c (2 sum_i y_ic p_ic + s) / (sum_i y_ic + sum_i p_ic + s)`` with
    sums over labelled pixels; ``W`` = ``class_weights`` normalised to sum 1, or the
    batch's :func:`dynamic_class_weights` when None.  Returns a scalar."""
    n_classes = y_pred.shape[-1]
    labels = ops.cast(y_true, "int32")
    annotated = ops.cast(ops.not_equal(labels, ignore), y_pred.dtype)[..., None]
    safe = ops.where(ops.not_equal(labels, ignore), labels, ops.zeros_like(labels))
    onehot = ops.one_hot(safe, n_classes, dtype=y_pred.dtype) * annotated
    if class_weights is None:
        weights = ops.cast(dynamic_class_weights(labels, n_classes, ignore), y_pred.dtype)
    else:
        weights = ops.cast(normalised_weights(ops.convert_to_tensor(class_weights, dtype="float32")), y_pred.dtype)
    probs = ops.clip(y_pred, epsilon, 1.0 - epsilon)
    n = ops.maximum(ops.sum(annotated), 1.0)
    ce = -ops.sum(onehot * ops.log(probs) * weights, axis=-1)
    wce = ops.sum(ce) / n
    axes = tuple(range(len(y_pred.shape) - 1))
    p = y_pred * annotated
    dice = (2.0 * ops.sum(onehot * p, axis=axes) + smooth) / (ops.sum(onehot, axis=axes) + ops.sum(p, axis=axes)
                                                              + smooth)
    wdl = 1.0 - ops.sum(weights * dice)
    return wce + wdl


@keras.saving.register_keras_serializable(package="h2g")
class WeightedCEDice(keras.losses.Loss):
    """:func:`weighted_ce_dice` as a serialisable Keras loss: ``class_weights`` a list
    (static) or None (dynamic, per batch); ``scale`` the output's branch weight (m-UNet's
    Eq. 7: the total loss is the branch-weighted sum over its outputs)."""

    def __init__(self, class_weights=None, ignore: int = 255, scale: float = 1.0, name: str = "weighted_ce_dice",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.ignore = int(ignore)
        self.scale = float(scale)  # the output's static branch weight

    def call(self, y_true, y_pred):
        return self.scale * weighted_ce_dice(y_true, y_pred, self.class_weights, self.ignore)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights, "ignore": self.ignore,
                "scale": self.scale}
