"""The in-graph cluster layers against scikit-learn, the statistics file, the VGG16
cluster model, ONNX export of the layers, and real Camelyon16 patches."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from h2g.core.errors import ModelError
from h2g.training import clustering
from h2g.training.clustering import (
    ClusterStats,
    NearestCentroid,
    PCAProject,
    Standardize,
    build_cluster_model,
    cluster_layers,
    fit_clusterer,
    fit_stats,
    n_clusters_of,
    vgg16_extractor,
)


@pytest.fixture(scope="module")
def blobs():
    """600 realistic 48-d feature vectors: 10 anisotropic blobs on very different scales."""
    x, _ = make_blobs(n_samples=600, n_features=48, centers=10, cluster_std=2.5, random_state=3)
    scales = np.random.default_rng(3).uniform(0.01, 50.0, size=48)
    return (x * scales + 7.0).astype(np.float32)


@pytest.fixture(scope="module")
def sklearn_fit(blobs):
    """An independent scikit-learn fit with the paper's settings."""
    x = blobs.astype(np.float64)
    scaler = StandardScaler().fit(x)
    pca = PCA(n_components=0.95, random_state=0).fit(scaler.transform(x))
    kmeans = KMeans(n_clusters=10, n_init=10, random_state=0).fit(pca.transform(scaler.transform(x)))
    return scaler, pca, kmeans


def close(got, ref):
    """Within 1e-4 relative to each value, or to the array's magnitude for values near 0."""
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_layers_agree_with_sklearn(blobs, sklearn_fit):
    scaler, pca, kmeans = sklearn_fit
    stats = fit_stats(blobs, n_clusters=10, variance=0.95, seed=0)
    assert 1 < stats.n_components < 48 and stats.n_clusters == 10
    standardize, project, nearest = cluster_layers(stats)
    assert [type(layer) for layer in (standardize, project, nearest)] == [Standardize, PCAProject, NearestCentroid]
    z = standardize(blobs)
    close(keras.ops.convert_to_numpy(z), scaler.transform(blobs.astype(np.float64)))
    projected = project(z)
    reference = pca.transform(scaler.transform(blobs.astype(np.float64)))
    close(keras.ops.convert_to_numpy(projected), reference)
    ids = keras.ops.convert_to_numpy(nearest(projected))
    assert ids.dtype == np.int32 and ids.shape == (600,)
    expected = kmeans.predict(reference)
    assert len(np.unique(expected)) == 10
    np.testing.assert_array_equal(ids, expected)
    # the layers are frozen
    assert all(not layer.trainable_weights for layer in (standardize, project, nearest))


def test_stats_file_roundtrip_and_errors(blobs, tmp_path):
    stats = fit_stats(blobs[:200], n_clusters=4, seed=1)
    path = stats.save(tmp_path / "cluster_stats.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster_stats.npz"]
    loaded = ClusterStats.load(path)
    for name in ("mean", "scale", "pca_mean", "components", "centroids"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
    assert loaded.metadata == stats.metadata and loaded.metadata["n_samples"] == 200
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not an npz file")
    with pytest.raises(ModelError, match="broken.npz"):
        ClusterStats.load(broken)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mean=stats.mean)
    with pytest.raises(ModelError, match="partial.npz.*missing"):
        ClusterStats.load(partial)
    with pytest.raises(ModelError, match="absent.npz"):
        ClusterStats.load(tmp_path / "absent.npz")
    with pytest.raises(ModelError, match="cannot fit 4 clusters"):
        fit_stats(blobs[:3], n_clusters=4)


def test_same_seed_same_statistics(blobs):
    a, b = fit_stats(blobs, seed=5), fit_stats(blobs, seed=5)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_layers_are_serialisable(blobs):
    stats = fit_stats(blobs[:100], n_clusters=3)
    for layer in cluster_layers(stats):
        clone = type(layer).from_config(layer.get_config())
        assert [w.shape for w in clone.weights] == [w.shape for w in layer.weights]
    assert isinstance(keras.saving.get_registered_object("h2g>NearestCentroid"), type)


def test_layers_export_to_onnx_with_identical_ids(blobs):
    tf2onnx = pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    stats = fit_stats(blobs, n_clusters=10)
    inputs = keras.Input((48,))
    x = inputs
    for layer in cluster_layers(stats):
        x = layer(x)
    model = keras.Model(inputs, x)
    spec = (tf.TensorSpec((None, 48), tf.float32, name="features"),)
    proto, _ = tf2onnx.convert.from_function(tf.function(lambda f: model(f)), input_signature=spec, opset=17)
    assert "ArgMin" in {node.op_type for node in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = session.run(None, {"features": blobs})[0]
    np.testing.assert_array_equal(ids, model.predict_on_batch(blobs))


def coloured_patches(n, size, seed):
    """Patches of three flat colours plus noise: three obvious tissue types."""
    rng = np.random.default_rng(seed)
    colours = np.array([[0.9, 0.3, 0.5], [0.4, 0.2, 0.7], [0.95, 0.9, 0.95]], np.float32)
    kind = rng.integers(0, 3, n)
    noise = rng.normal(0, 0.03, (n, size, size, 3)).astype(np.float32)
    return np.clip(colours[kind][:, None, None, :] + noise, 0, 1), kind


def reference_ids(features, stats):
    """KMeans.predict written out with the statistics, in float64 numpy."""
    z = (features - stats.mean) / stats.scale
    projected = (z - stats.pca_mean) @ stats.components.T
    return np.argmin(((projected[:, None, :] - stats.centroids[None]) ** 2).sum(-1), axis=1)


@pytest.mark.slow
def test_vgg16_cluster_model_end_to_end(tmp_path):
    keras.utils.set_random_seed(0)
    extractor = vgg16_extractor(weights=None, input_size=32, patch_size=64)
    assert extractor.output_shape == (None, 512) and extractor.input_shape == (None, 64, 64, 3)
    assert extractor.get_layer("vgg16").get_layer(clustering.FEATURE_LAYER) is not None
    patches, _ = coloured_patches(48, 64, seed=0)
    stats = fit_clusterer([patches[:24], patches[24:]], extractor, n_clusters=3, seed=0)
    assert stats.metadata["n_features"] == 512 and stats.metadata["input_shape"] == [64, 64, 3]
    model = build_cluster_model(stats, extractor)
    assert not model.trainable_weights and n_clusters_of(model) == 3
    ids = model.predict_on_batch(patches)
    assert ids.dtype == np.int32 and ids.shape == (48,)
    features = extractor.predict_on_batch(patches).astype(np.float64)
    np.testing.assert_array_equal(ids, reference_ids(features, stats))
    path = tmp_path / "cluster_model.keras"
    model.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path).predict_on_batch(patches), ids)
    # a weights file given by path
    weights = tmp_path / "vgg16.weights.h5"
    extractor.get_layer("vgg16").save_weights(weights)
    reloaded = vgg16_extractor(weights=weights, input_size=32, patch_size=64)
    np.testing.assert_allclose(reloaded.predict_on_batch(patches[:4]), features[:4], rtol=1e-5)


def test_vgg16_preprocessing_is_vggs_own():
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    got = keras.ops.convert_to_numpy(clustering.VGGPreprocess()(x))
    expected = x[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_missing_weights_and_feature_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    if clustering._cached_vgg16_weights() is None:  # /tmp/.keras may hold a real copy
        with pytest.raises(ModelError, match="not in the Keras cache"):
            vgg16_extractor(weights="imagenet")
    with pytest.raises(ModelError, match="missing.h5"):
        vgg16_extractor(weights=tmp_path / "missing.h5")
    inputs = keras.Input((8, 8, 3))
    small = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    stats = fit_stats(np.random.default_rng(0).random((20, 5)), n_clusters=2)
    with pytest.raises(ModelError, match="expect 5 features"):
        build_cluster_model(stats, small)
    with pytest.raises(ModelError, match=r"\(B, H, W, 3\)"):
        fit_clusterer([np.zeros((4, 8, 8))], small)


def load_camelyon(folder):
    """RGBA patches composited on white (glass), float32 in [0, 1]."""
    images = []
    for path in sorted(folder.glob("*.png")):
        rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        images.append(rgba[..., :3] * alpha + (1 - alpha))
    return np.stack(images)


@pytest.mark.slow
def test_real_camelyon_patches_through_cluster_model_and_classifier(real_data):
    from h2g.training.fit import evaluate_classifier
    from h2g.training.losses import CWCELoss, cluster_guided

    folder = real_data / "camelyon16_patches"
    tumour, normal = load_camelyon(folder / "tumor"), load_camelyon(folder / "normal")
    assert tumour.shape[1:] == (256, 256, 3) and len(tumour) + len(normal) == 89
    patches = np.concatenate([tumour, normal])
    labels = np.eye(2, dtype=np.float32)[[1] * len(tumour) + [0] * len(normal)]
    keras.utils.set_random_seed(0)
    extractor = vgg16_extractor(weights=None, input_size=32)  # 256 -> 32 in graph
    stats = fit_clusterer(np.array_split(patches, 3), extractor, n_clusters=10, seed=0)
    cluster_model = build_cluster_model(stats, extractor)
    ids = cluster_model.predict(patches, batch_size=32, verbose=0)
    assert ids.shape == (89,) and ids.min() >= 0 and ids.max() < 10
    assert len(np.unique(ids)) > 1
    inputs = keras.Input((256, 256, 3))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    classifier = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    wrapper = cluster_guided(classifier, cluster_model)
    packed = wrapper.predict(patches, batch_size=32, verbose=0)
    assert packed.shape == (89, 12) and np.isfinite(packed).all()
    np.testing.assert_array_equal(packed[:, 2:].argmax(1), ids)
    assert np.isfinite(float(CWCELoss(2)(labels, packed)))
    metrics = evaluate_classifier(wrapper, tf.data.Dataset.from_tensor_slices((patches, labels)).batch(32))
    assert metrics["n_patches"] == 89 and np.isfinite(metrics["loss"])
