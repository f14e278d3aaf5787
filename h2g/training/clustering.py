"""k-means cluster guiding (paper Section 2.3): a frozen, in-graph tissue-type clusterer.

Fitting (scikit-learn, once, from sampler batches)::

    patches (B, 256, 256, 3) float32 in [0, 1]
      -> feature extractor  (VGG16 by default, see :func:`vgg16_extractor`)  -> (B, D)
      -> StandardScaler -> PCA(n_components=0.95) -> KMeans(n_clusters=10)

The fitted statistics are a :class:`ClusterStats`, saved as ONE ``.npz`` file.

Training (Keras, in graph): :func:`build_cluster_model` puts the extractor and three
layers holding the fitted statistics as non-trainable weights into one frozen model,
``patches -> (B,) int32 cluster ids``:

* :class:`Standardize` -- ``(x - mean) / scale`` (``StandardScaler.transform``);
* :class:`PCAProject` -- ``(x - pca_mean) @ components.T`` (``PCA.transform``, no whitening);
* :class:`NearestCentroid` -- index of the nearest centroid in Euclidean distance
  (``KMeans.predict``), with ``tf.argmin`` so that the graph converts to ONNX/OpenVINO.

Pluggability: nothing downstream depends on VGG16 or k-means.  A *feature extractor* is
any Keras model mapping patches ``(B, H, W, 3)`` float32 in [0, 1] to ``(B, D)`` features
(it can replace VGG16 in :func:`fit_clusterer` and :func:`build_cluster_model`).  A
*cluster model* is any Keras model mapping patches to ``(B,)`` integer ids in
``[0, n_clusters)``; the CWCE loss and its training wrapper (:mod:`h2g.training.losses`) and the
trainer (:mod:`h2g.training`) only use that contract.  They find ``n_clusters`` with
:func:`n_clusters_of` (any layer with an integer ``n_clusters`` attribute) or are told it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from h2g.core.errors import ModelError

#: The VGG16 layer whose output, global-average-pooled, is the feature vector.
FEATURE_LAYER = "block5_pool"
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


@keras.saving.register_keras_serializable(package="h2g")
class VGGPreprocess(keras.layers.Layer):
    """Patches in [0, 1] -> VGG16's own input convention ("caffe": x 255, RGB -> BGR,
    ImageNet channel means subtracted), via ``keras.applications.vgg16.preprocess_input``."""

    def call(self, x):
        return keras.applications.vgg16.preprocess_input(x * 255.0)


def _cached_vgg16_weights() -> Path | None:
    """The ImageNet no-top weights in Keras' cache (where ``keras.applications`` would
    download them), or None.  Keras falls back to /tmp/.keras when its home is read-only."""
    homes = [Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")), Path("/tmp/.keras")]
    for home in homes:
        path = home / "models" / VGG16_NOTOP_FILE
        if path.is_file():
            return path
    return None


def vgg16_extractor(weights: str | os.PathLike | None = "imagenet", input_size: int = 256,
                    patch_size: int = 256) -> keras.Model:
    """The paper's feature extractor: VGG16 without its classifier head; features are the
    output of ``block5_pool`` (the last max-pooling, 8 x 8 x 512 at 256 x 256 input)
    followed by global average pooling -> 512-d.

    Input: patches ``(B, patch_size, patch_size, 3)`` float32 in [0, 1].  When
    ``input_size`` differs from ``patch_size`` the patches are first resized in graph
    ("area" interpolation) -- a cheap option for small presets and tests.

    ``weights``: ``"imagenet"`` (must already be in the Keras cache: nothing is
    downloaded; otherwise :class:`ModelError`), a path to a weights file, or None
    (random initialisation; seed with ``keras.utils.set_random_seed``).
    """
    if weights == "imagenet":
        if _cached_vgg16_weights() is None:
            raise ModelError(
                f"{VGG16_NOTOP_FILE}: VGG16 ImageNet weights are not in the Keras cache "
                f"(~/.keras/models or $KERAS_HOME/models) and nothing is downloaded at run "
                f"time; place the file there, pass a weights path, or use weights=None")
        vgg_weights = str(_cached_vgg16_weights())
    elif weights is not None:
        if not Path(weights).is_file():
            raise ModelError(f"{weights}: VGG16 weights file not found")
        vgg_weights = str(weights)
    else:
        vgg_weights = None
    patches = keras.Input((patch_size, patch_size, 3), name="patches")
    x = patches
    if input_size != patch_size:
        x = keras.layers.Resizing(input_size, input_size, interpolation="area", name="resize")(x)
    x = VGGPreprocess(name="vgg_preprocess")(x)
    backbone = keras.applications.VGG16(include_top=False, weights=None,
                                        input_shape=(input_size, input_size, 3))
    if vgg_weights is not None:
        try:
            backbone.load_weights(vgg_weights)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{vgg_weights}: cannot load VGG16 weights: {exc}") from None
    x = backbone(x)
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(patches, features, name="vgg16_features")


# ---------------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package="h2g")
class Standardize(keras.layers.Layer):
    """``(x - mean) / scale`` with non-trainable ``mean`` and ``scale`` (D,)."""

    def __init__(self, n_features: int, **kwargs):
        super().__init__(**kwargs)
        self.n_features = int(n_features)
        self.mean = self.add_weight(shape=(self.n_features,), initializer="zeros",
                                    trainable=False, name="mean")
        self.scale = self.add_weight(shape=(self.n_features,), initializer="ones",
                                     trainable=False, name="scale")

    def call(self, x):
        return (x - self.mean) / self.scale

    def get_config(self):
        return {**super().get_config(), "n_features": self.n_features}


@keras.saving.register_keras_serializable(package="h2g")
class PCAProject(keras.layers.Layer):
    """``(x - mean) @ components.T``: ``mean`` (D,), ``components`` (P, D), non-trainable."""

    def __init__(self, n_features: int, n_components: int, **kwargs):
        super().__init__(**kwargs)
        self.n_features = int(n_features)
        self.n_components = int(n_components)
        self.mean = self.add_weight(shape=(self.n_features,), initializer="zeros",
                                    trainable=False, name="mean")
        self.components = self.add_weight(shape=(self.n_components, self.n_features),
                                          initializer="zeros", trainable=False,
                                          name="components")

    def call(self, x):
        return keras.ops.matmul(x - self.mean, keras.ops.transpose(self.components))

    def get_config(self):
        return {**super().get_config(), "n_features": self.n_features,
                "n_components": self.n_components}


@keras.saving.register_keras_serializable(package="h2g")
class NearestCentroid(keras.layers.Layer):
    """Index of the nearest of ``n_clusters`` centroids (K, P) in Euclidean distance,
    as int32 ``(B,)``.  Uses ``tf.argmin`` (``keras.ops.argmin`` emits ops that
    tf2onnx/OpenVINO cannot convert)."""

    def __init__(self, n_clusters: int, n_components: int, **kwargs):
        super().__init__(**kwargs)
        self.n_clusters = int(n_clusters)
        self.n_components = int(n_components)
        self.centroids = self.add_weight(shape=(self.n_clusters, self.n_components),
                                         initializer="zeros", trainable=False,
                                         name="centroids")

    def call(self, x):
        diff = keras.ops.expand_dims(x, 1) - keras.ops.expand_dims(self.centroids, 0)
        distances = keras.ops.sum(keras.ops.square(diff), axis=-1)
        return tf.argmin(distances, axis=1, output_type=tf.int32)

    def get_config(self):
        return {**super().get_config(), "n_clusters": self.n_clusters,
                "n_components": self.n_components}


# ---------------------------------------------------------------------------- statistics
_ARRAYS = ("mean", "scale", "pca_mean", "components", "centroids")


@dataclass
class ClusterStats:
    """Fitted clustering statistics: StandardScaler ``mean``/``scale`` (D,), PCA
    ``pca_mean`` (D,) and ``components`` (P, D), k-means ``centroids`` (K, P), plus
    JSON-able ``metadata`` (extractor, n_samples, explained variance, seed, ...)."""

    mean: np.ndarray
    scale: np.ndarray
    pca_mean: np.ndarray
    components: np.ndarray
    centroids: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` file (arrays + metadata as a JSON string); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # a file object keeps the name (no ".npz" appended)
            np.savez(fh, **{name: getattr(self, name) for name in _ARRAYS},
                     metadata=np.array(json.dumps(self.metadata, sort_keys=True)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClusterStats":
        """Read a file written by :meth:`save`; :class:`ModelError` when it is missing,
        unreadable, incomplete or inconsistent."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in (*_ARRAYS, "metadata") if k not in data]
                if missing:
                    raise ModelError(f"{path}: not a cluster statistics file (missing {missing})")
                arrays = {k: np.asarray(data[k], dtype=np.float64) for k in _ARRAYS}
                metadata = json.loads(str(data["metadata"]))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read cluster statistics: {exc}") from None
        stats = cls(**arrays, metadata=metadata)
        d, p = stats.n_features, stats.n_components
        if (stats.scale.shape != (d,) or stats.pca_mean.shape != (d,)
                or stats.components.shape != (p, d) or stats.centroids.shape[1:] != (p,)):
            raise ModelError(f"{path}: cluster statistics have inconsistent shapes")
        return stats


def fit_stats(features: np.ndarray, n_clusters: int = 10, variance: float = 0.95,
              seed: int = 0, n_init: int = 10) -> ClusterStats:
    """StandardScaler -> PCA(n_components=variance) -> KMeans(n_clusters, n_init,
    random_state=seed) on ``features`` (N, D), fitted in float64."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < n_clusters:
        raise ModelError(f"cannot fit {n_clusters} clusters on features of shape {features.shape}")
    scaler = StandardScaler().fit(features)
    standardized = scaler.transform(features)
    pca = PCA(n_components=variance, random_state=seed).fit(standardized)
    projected = pca.transform(standardized)
    kmeans = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(projected)
    return ClusterStats(
        mean=scaler.mean_, scale=scaler.scale_, pca_mean=pca.mean_,
        components=pca.components_, centroids=kmeans.cluster_centers_,
        metadata={"n_samples": int(len(features)), "n_clusters": int(n_clusters),
                  "variance": float(variance), "seed": int(seed), "n_init": int(n_init),
                  "explained_variance": float(pca.explained_variance_ratio_.sum()),
                  "inertia": float(kmeans.inertia_)},
    )


def extract_features(images: Iterable[np.ndarray], extractor: keras.Model) -> np.ndarray:
    """Run ``extractor`` over batches of patches (B, H, W, 3) float32 in [0, 1]; (N, D)."""
    out = []
    for batch in images:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ModelError(f"cluster fitting expects patch batches (B, H, W, 3), got {batch.shape}")
        out.append(np.asarray(extractor.predict_on_batch(batch), dtype=np.float32))
    if not out:
        raise ModelError("cluster fitting got no patch batches")
    return np.concatenate(out)


def fit_clusterer(images: Iterable[np.ndarray], extractor: keras.Model, n_clusters: int = 10,
                  variance: float = 0.95, seed: int = 0, n_init: int = 10) -> ClusterStats:
    """Extract features of every batch in ``images`` (numpy float32 in [0, 1]) and fit
    :func:`fit_stats`; the extractor's name and feature size go into the metadata."""
    features = extract_features(images, extractor)
    stats = fit_stats(features, n_clusters=n_clusters, variance=variance, seed=seed, n_init=n_init)
    stats.metadata.update({"extractor": extractor.name,
                           "input_shape": list(extractor.input_shape[1:]),
                           "n_features": int(features.shape[1])})
    return stats


# ---------------------------------------------------------------------------- models
def cluster_layers(stats: ClusterStats) -> list[keras.layers.Layer]:
    """[Standardize, PCAProject, NearestCentroid] holding ``stats`` (float32)."""
    d, p, k = stats.n_features, stats.n_components, stats.n_clusters
    standardize = Standardize(d, name="standardize")
    project = PCAProject(d, p, name="pca")
    nearest = NearestCentroid(k, p, name="nearest_centroid")
    standardize.set_weights([stats.mean, stats.scale])
    project.set_weights([stats.pca_mean, stats.components])
    nearest.set_weights([stats.centroids])
    return [standardize, project, nearest]


def build_cluster_model(stats: ClusterStats, extractor: keras.Model) -> keras.Model:
    """Frozen model ``patches -> (B,) int32 cluster ids``: extractor + the three layers."""
    n_out = extractor.output_shape[-1]
    if n_out != stats.n_features:
        raise ModelError(f"cluster statistics expect {stats.n_features} features but the "
                         f"extractor {extractor.name!r} gives {n_out}")
    x = extractor.output
    for layer in cluster_layers(stats):
        x = layer(x)
    model = keras.Model(extractor.input, x, name="cluster_model")
    model.trainable = False
    return model


def n_clusters_of(model: keras.Model) -> int | None:
    """The number of clusters a cluster model assigns to: the ``n_clusters`` attribute
    of the first (possibly nested) layer that has one; None when no layer has."""
    value = getattr(model, "n_clusters", None)
    if isinstance(value, int):
        return value
    for layer in getattr(model, "layers", ()):
        found = n_clusters_of(layer)
        if found is not None:
            return found
    return None
