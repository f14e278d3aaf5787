"""CWCE against a plain numpy reference and hand-computed values; the cluster-guided
training wrapper; the Dice loss against hand values and scikit-learn's F1."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score

from h2g.core.errors import ModelError
from h2g.training.losses import (
    CWCELoss,
    cluster_guided,
    cwce,
    dice_loss,
    unwrap_classifier,
)


def cwce_reference(y, p, q, normalise=True, eps=1e-7):
    """Literal loops over the clusters present in the batch."""
    p = np.clip(p.astype(np.float64), eps, 1 - eps)
    ce = -(y * np.log(p)).sum(axis=1)
    terms = []
    for k in np.unique(q):
        members = ce[q == k]
        terms.append(members.mean() if normalise else members.sum())
    return float(np.mean(terms)) if terms else 0.0


def random_batch(rng, b, c, k):
    logits = rng.normal(size=(b, c)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.eye(c)[rng.integers(0, c, b)]
    q = rng.integers(0, k, b)
    return y.astype(np.float32), p.astype(np.float32), q.astype(np.int32)


def value(x) -> float:
    return float(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("seed,b,c,k", [(0, 32, 2, 10), (1, 64, 2, 10), (2, 16, 3, 4), (3, 7, 2, 20)])
def test_cwce_matches_numpy_reference(seed, b, c, k, normalise):
    y, p, q = random_batch(np.random.default_rng(seed), b, c, k)
    got = value(cwce(y, p, q, k, normalise=normalise))
    assert got == pytest.approx(cwce_reference(y, p, q, normalise), rel=1e-5)


def test_cwce_hand_computed():
    # tumour probabilities 0.9, 0.2, 0.6, 0.5; labels 1, 0, 1, 0; clusters 0, 0, 1, 3
    p1 = np.array([0.9, 0.2, 0.6, 0.5], np.float32)
    p = np.stack([1 - p1, p1], axis=1)
    y = np.eye(2, dtype=np.float32)[[1, 0, 1, 0]]
    q = np.array([0, 0, 1, 3])
    ln = [-math.log(0.9), -math.log(0.8), -math.log(0.6), -math.log(0.5)]
    macro = ((ln[0] + ln[1]) / 2 + ln[2] + ln[3]) / 3  # 0.45607...
    literal = sum(ln) / 3  # Eq. (1): no per-cluster normalisation, 1/K_b with K_b = 3
    assert value(cwce(y, p, q, 10)) == pytest.approx(macro, rel=1e-6)
    assert value(cwce(y, p, q, 10, normalise=False)) == pytest.approx(literal, rel=1e-6)
    assert macro == pytest.approx(0.456075, abs=1e-6) and literal == pytest.approx(0.510826, abs=1e-6)


def test_single_cluster_is_plain_cross_entropy():
    y, p, _ = random_batch(np.random.default_rng(5), 24, 2, 1)
    q = np.full(24, 7)
    plain = float(np.mean(keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(y, p))))
    assert value(cwce(y, p, q, 10)) == pytest.approx(plain, rel=1e-5)
    assert value(cwce(y, p, q, 10, normalise=False)) == pytest.approx(24 * plain, rel=1e-5)


def test_each_present_cluster_weighs_the_same():
    """Repeating the samples of one cluster does not change the macro average."""
    y, p, q = random_batch(np.random.default_rng(6), 12, 2, 3)
    extra = q == q[0]
    y2, p2, q2 = (np.concatenate([a, a[extra], a[extra]]) for a in (y, p, q))
    assert value(cwce(y2, p2, q2, 3)) == pytest.approx(value(cwce(y, p, q, 3)), rel=1e-6)


def test_extreme_and_degenerate_batches_are_finite():
    eps = 1e-7
    p = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    wrong = np.eye(2, dtype=np.float32)[[1, 0, 1]]  # every prediction certain and wrong
    right = np.eye(2, dtype=np.float32)[[0, 1, 0]]
    q = np.array([2, 2, 5])
    assert value(cwce(wrong, p, q, 10)) == pytest.approx(-math.log(eps), rel=1e-4)
    assert 0 <= value(cwce(right, p, q, 10)) < 1e-6
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = cwce(wrong, p, q, 10)
    assert np.isfinite(tape.gradient(loss, p).numpy()).all()
    only_normal = np.eye(2, dtype=np.float32)[[0, 0, 0]]  # one class absent
    assert np.isfinite(value(cwce(only_normal, p, q, 10)))
    empty = value(cwce(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.int32), 10))
    assert empty == 0.0


def test_loss_object_unpacks_the_packed_output():
    y, p, q = random_batch(np.random.default_rng(7), 20, 2, 10)
    packed = np.concatenate([p, np.eye(10, dtype=np.float32)[q]], axis=1)
    for normalise in (True, False):
        loss = CWCELoss(n_classes=2, normalise=normalise)
        assert value(loss(y, packed)) == pytest.approx(cwce_reference(y, p, q, normalise), rel=1e-5)
    restored = CWCELoss.from_config(CWCELoss(2, normalise=False).get_config())
    assert restored.normalise is False and restored.n_classes == 2
    with pytest.raises(ModelError, match="packed output"):
        CWCELoss(n_classes=2)(y, p)  # a plain classifier's output: refuse, never a silent 0


class _FirstPixelCluster(keras.layers.Layer):
    """A stand-in cluster model: cluster = red value of pixel (0, 0) binned into 3."""

    n_clusters = 3

    def call(self, x):
        return tf.cast(tf.clip_by_value(x[:, 0, 0, 0] * 3, 0, 2.999), tf.int32)


def tiny_classifier(size=8):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="tiny_classifier")


def test_wrapper_packs_probabilities_and_frozen_clusters(tmp_path):
    keras.utils.set_random_seed(0)
    classifier = tiny_classifier()
    inputs = keras.Input((8, 8, 3))
    cluster_model = keras.Model(inputs, _FirstPixelCluster()(inputs), name="first_pixel")
    wrapper = cluster_guided(classifier, cluster_model)
    x = np.random.default_rng(0).random((6, 8, 8, 3)).astype(np.float32)
    out = keras.ops.convert_to_numpy(wrapper(x))
    assert out.shape == (6, 5)
    np.testing.assert_allclose(out[:, :2], classifier.predict_on_batch(x), rtol=1e-6)
    expected_ids = np.minimum((x[:, 0, 0, 0] * 3).astype(int), 2)
    np.testing.assert_array_equal(out[:, 2:], np.eye(3)[expected_ids])
    # only the classifier learns; gradients reach it through the packed output
    assert [v.path for v in wrapper.trainable_variables] == [v.path for v in classifier.trainable_variables]
    y = np.eye(2, dtype=np.float32)[[0, 1, 0, 1, 1, 0]]
    with tf.GradientTape() as tape:
        loss = CWCELoss(2)(y, wrapper(x, training=True))
    grads = tape.gradient(loss, wrapper.trainable_variables)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert unwrap_classifier(wrapper) is classifier and unwrap_classifier(classifier) is classifier


def test_wrapper_rejects_unknown_cluster_count_and_shape_mismatch():
    classifier = tiny_classifier()
    inputs = keras.Input((8, 8, 3))
    no_count = keras.Model(inputs, keras.layers.Lambda(lambda t: tf.zeros_like(t[:, 0, 0, 0], tf.int32))(inputs))
    with pytest.raises(ModelError, match="n_clusters"):
        cluster_guided(classifier, no_count)
    assert cluster_guided(classifier, no_count, n_clusters=4).n_clusters == 4
    other = keras.Input((16, 16, 3))
    with pytest.raises(ModelError, match="does not match"):
        cluster_guided(classifier, keras.Model(other, _FirstPixelCluster()(other)))


def test_dice_loss_hand_values_and_f1():
    # one image, 4 pixels, 2 classes: target tumour at pixels 0, 1
    y = np.eye(2, dtype=np.float32)[[1, 1, 0, 0]].reshape(1, 2, 2, 2)
    p1 = np.array([0.8, 0.4, 0.2, 0.0], np.float32)
    p = np.stack([1 - p1, p1], -1).reshape(1, 2, 2, 2)
    tumour = (2 * 1.2 + 1) / (2 + 1.4 + 1)     # 2*sum(y p) + s over sum y + sum p + s
    normal = (2 * 1.8 + 1) / (2 + 2.6 + 1)
    got = keras.ops.convert_to_numpy(dice_loss(y, p))
    assert got.shape == (1,)
    assert got[0] == pytest.approx(1 - (tumour + normal) / 2, rel=1e-6)
    assert keras.ops.convert_to_numpy(dice_loss(y, y))[0] == pytest.approx(0.0, abs=1e-7)
    # hard predictions, no smoothing: 1 - loss is the macro F1 over pixels of each image
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 2, (3, 6, 6)), rng.integers(0, 2, (3, 6, 6))
    got = keras.ops.convert_to_numpy(
        dice_loss(np.eye(2, dtype=np.float32)[labels], np.eye(2, dtype=np.float32)[preds], smooth=0.0))
    for i in range(3):
        f1 = f1_score(labels[i].ravel(), preds[i].ravel(), average="macro")
        assert 1 - got[i] == pytest.approx(f1, rel=1e-6)


def test_models_compiled_with_dice_loss_reload(tmp_path):
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="softmax")(inputs))
    model.compile("adam", loss=dice_loss)
    model.train_on_batch(np.zeros((1, 4, 4, 1), np.float32), np.eye(2, dtype=np.float32)[np.zeros((1, 4, 4), int)])
    model.save(tmp_path / "refiner.keras")
    restored = keras.models.load_model(tmp_path / "refiner.keras")
    x = np.random.default_rng(0).random((2, 4, 4, 1)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.random.default_rng(1).integers(0, 2, (2, 4, 4))]
    assert restored.evaluate(x, y, verbose=0) == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-6)


# ---------------------------------------------------------------- DMMN weighted cross-entropy
def _wce_numpy(labels, probs, weights, ignore=255):
    """Reference: loop over pixels, w[y] * -log p[y] where annotated, else 0."""
    out = np.zeros(labels.shape, np.float64)
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y != ignore:
            out[idx] = -weights[y] * math.log(max(probs[idx][y], 1e-7))
    return out


def test_weighted_crossentropy_matches_a_pixel_loop():
    from h2g.training.losses import weighted_crossentropy

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (2, 5, 6))
    labels[rng.random(labels.shape) < 0.3] = 255
    probs = rng.dirichlet(np.ones(4), size=(2, 5, 6)).astype(np.float32)
    weights = np.array([0.9, 0.5, 0.75, 0.85], np.float32)
    got = np.asarray(weighted_crossentropy(tf.constant(labels), tf.constant(probs), weights))
    np.testing.assert_allclose(got, _wce_numpy(labels, probs, weights), rtol=1e-5, atol=1e-6)


def test_weighted_crossentropy_loss_object_mean_and_reload(tmp_path):
    from h2g.training.losses import WeightedCrossEntropy

    labels = np.array([[[0, 1], [255, 2]]])
    probs = np.array([[[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]], [[1 / 3] * 3, [0.1, 0.1, 0.8]]]], np.float32)
    weights = [0.5, 1.0, 2.0]
    expected = (0.5 * -math.log(0.5) + 1.0 * -math.log(0.6) + 0 + 2.0 * -math.log(0.8)) / 4  # mean over all 4 px
    loss = WeightedCrossEntropy(weights)
    assert float(loss(tf.constant(labels), tf.constant(probs))) == pytest.approx(expected, rel=1e-5)
    again = WeightedCrossEntropy.from_config(loss.get_config())
    assert again.class_weights == weights and again.ignore == 255


def test_ignored_pixels_have_no_gradient():
    from h2g.training.losses import weighted_crossentropy

    labels = tf.constant([[[0, 255], [1, 255]]])
    logits = tf.Variable(np.random.default_rng(0).normal(size=(1, 2, 2, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(weighted_crossentropy(labels, tf.nn.softmax(logits), [1.0, 1.0, 1.0]))
    grad = tape.gradient(loss, logits).numpy()
    assert np.all(grad[0, :, 1] == 0.0)       # the ignored column
    assert np.all(np.abs(grad[0, :, 0]).sum(-1) > 0)  # annotated pixels do get a gradient


def test_class_weights_from_counts():
    from h2g.training.losses import class_weights_from_counts

    np.testing.assert_allclose(class_weights_from_counts([60, 30, 10]), [0.4, 0.7, 0.9], rtol=1e-6)
    with pytest.raises(ModelError):
        class_weights_from_counts([0, 0])
