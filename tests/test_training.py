"""Gradient accumulation, the generic fit loop (smoke training, resume, early stopping,
run-folder files), CWCE training through the cluster-guided wrapper, and patch metrics."""
from __future__ import annotations

import json
import logging
import math
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from h2g.core.errors import ConfigError, ModelError
from h2g.training.clustering import build_cluster_model, fit_clusterer
from h2g.training.fit import evaluate_classifier, fit, read_log
from h2g.training.losses import (
    ClusterGuided,
    CWCELoss,
    cluster_guided,
    unwrap_classifier,
)

SIZE, BATCH = 12, 8
COLOURS = tf.constant([[0.55, 0.35, 0.75], [0.75, 0.35, 0.55]])  # normal, tumour


def toy_batch(index):
    """Batch ``index`` of a separable toy: tumour patches are redder than normal ones.
    Stateless in ``index`` (like the hierarchical sampler)."""
    seed = tf.stack([tf.constant(11, tf.int64), tf.cast(index, tf.int64)])
    labels = tf.random.stateless_uniform((BATCH,), seed, 0, 2, dtype=tf.int32)
    noise = tf.random.stateless_uniform((BATCH, SIZE, SIZE, 3), seed + 1, -0.3, 0.3)
    images = tf.clip_by_value(tf.gather(COLOURS, labels)[:, None, None, :] + noise, 0.0, 1.0)
    return images, tf.one_hot(labels, 2)


def toy_train(start_batch: int) -> tf.data.Dataset:
    return tf.data.Dataset.counter(start_batch).map(toy_batch)


def toy_val() -> tf.data.Dataset:
    return tf.data.Dataset.range(10_000, 10_004).map(toy_batch)


def tiny_classifier(seed: int, dropout: float = 0.3, filters: int = 4) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(filters, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x), name="tiny")


def dense_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def dense_data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(x[:, 0] + x[:, 1] > 0).astype(int)]
    return x, y


def test_sgd_accumulation_equals_one_big_batch():
    """4 micro-batches of 8 with accumulation = one SGD step on the mean gradient of 32."""
    x, y = dense_data(32)
    model = dense_model(0)
    initial = [w.copy() for w in model.get_weights()]
    with tf.GradientTape() as tape:
        loss = keras.losses.categorical_crossentropy(y, model(x))
        loss = tf.reduce_mean(loss)
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    expected = [w - 0.5 * g for w, g in zip(initial, grads)]
    model.compile(keras.optimizers.SGD(0.5, gradient_accumulation_steps=4), "categorical_crossentropy")
    for i in range(4):
        model.train_on_batch(x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8])
        if i < 3:  # accumulating: no update yet
            for w, w0 in zip(model.get_weights(), initial):
                np.testing.assert_array_equal(w, w0)
    for w, e in zip(model.get_weights(), expected):
        np.testing.assert_allclose(w, e, atol=1e-6)
    assert int(model.optimizer.iterations) == 1


@pytest.mark.slow
def test_adam_accumulation_in_fit_equals_big_batches(tmp_path):
    """Through fit: 8 micro-batches of 8 with accumulation 4 = 2 Adam steps on batches of 32."""
    x, y = dense_data(64)
    micro = lambda start: tf.data.Dataset.counter(start).map(
        lambda i: (tf.gather(x, tf.range(8, dtype=tf.int64) + 8 * (i % 8)), tf.gather(y, tf.range(8, dtype=tf.int64) + 8 * (i % 8))))
    big = lambda start: tf.data.Dataset.counter(start).map(
        lambda i: (tf.gather(x, tf.range(32, dtype=tf.int64) + 32 * (i % 2)), tf.gather(y, tf.range(32, dtype=tf.int64) + 32 * (i % 2))))
    common = dict(loss="categorical_crossentropy", epochs=1, learning_rate=1e-2, monitor="loss",
                  restore_best=False, verbose=0)
    accumulated, plain = dense_model(1), dense_model(1)
    initial = plain.get_weights()
    fit(accumulated, micro, None, run_dir=tmp_path / "a", steps_per_epoch=8, accumulation_steps=4, **common)
    fit(plain, big, None, run_dir=tmp_path / "b", steps_per_epoch=2, **common)
    assert int(accumulated.optimizer.iterations) == 2 == int(plain.optimizer.iterations)
    for a, b, w0 in zip(accumulated.get_weights(), plain.get_weights(), initial):
        assert np.abs(b - w0).max() > 1e-3  # the updates are real
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_smoke_training_beats_chance_and_writes_the_run_folder(tmp_path):
    model = tiny_classifier(0)
    result = fit(model, toy_train, toy_val(), loss="categorical_crossentropy", run_dir=tmp_path,
                 epochs=2, steps_per_epoch=12, learning_rate=3e-2, metrics=["accuracy"], verbose=0)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"best.keras", "best.npz", "last.npz", "state.json", "log.csv", "curves.png"} <= names
    assert Image.open(tmp_path / "curves.png").format == "PNG"
    history = result.history
    assert history["epoch"] == [1, 2] and result.epochs_completed == 2 and not result.stopped_early
    assert result.best_value == min(history["val_loss"])
    assert result.best_epoch == 1 + int(np.argmin(history["val_loss"]))
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 2
    # the model ends with the best weights; sklearn-based metrics agree with Keras'
    metrics = evaluate_classifier(model, toy_val())
    keras_loss, keras_accuracy = model.evaluate(toy_val(), verbose=0)
    assert metrics["n_patches"] == 32
    assert metrics["accuracy"] == pytest.approx(keras_accuracy) and metrics["accuracy"] > 0.8
    assert metrics["loss"] == pytest.approx(keras_loss, rel=1e-4) == pytest.approx(result.best_value, rel=1e-4)
    assert metrics["recall"] > 0.5 and metrics["precision"] > 0.5


def train(run_dir, epochs, resume=False, seed=0, model_seed=0):
    model = tiny_classifier(model_seed, dropout=0.5)
    result = fit(model, toy_train, toy_val(), loss="categorical_crossentropy", run_dir=run_dir,
                 epochs=epochs, steps_per_epoch=3, accumulation_steps=2, learning_rate=1e-2,
                 resume=resume, seed=seed, restore_best=False, verbose=0)
    return model, result


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Dropout RNG, Adam moments and a gradient-accumulation window that spans the epoch
    boundary (3 micro-batches per epoch, accumulation 2) all continue exactly."""
    straight, straight_result = train(tmp_path / "straight", 2)
    _, first = train(tmp_path / "resumed", 1)
    assert first.epochs_completed == 1
    # a copy whose Dropout RNG restarts on resume (what reloading a .keras file alone gives)
    shutil.copytree(tmp_path / "resumed", tmp_path / "rng_lost")
    fresh = tiny_classifier(0, dropout=0.5)
    weights = {id(w) for w in fresh.weights}
    initial_rng = [v.numpy() for v in fresh.variables if id(v) not in weights]
    with np.load(tmp_path / "rng_lost" / "last.npz") as data:
        arrays = dict(data)
    assert sum(k.startswith("rng_") for k in arrays) == len(initial_rng) > 0
    assert any(not np.array_equal(arrays[f"rng_{i}"], v) for i, v in enumerate(initial_rng))
    arrays.update({f"rng_{i}": v for i, v in enumerate(initial_rng)})
    np.savez(tmp_path / "rng_lost" / "last.npz", **arrays)
    resumed, resumed_result = train(tmp_path / "resumed", 2, resume=True)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert resumed_result.history == straight_result.history
    assert resumed_result.best_epoch == straight_result.best_epoch
    lost, _ = train(tmp_path / "rng_lost", 2, resume=True)  # the comparison has power
    assert max(np.abs(a - b).max() for a, b in zip(straight.get_weights(), lost.get_weights())) > 1e-6
    # a finished run is not trained again
    again, again_result = train(tmp_path / "resumed", 2, resume=True)
    assert again_result.history == straight_result.history
    for a, b in zip(again.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_early_stopping_with_patience(tmp_path):
    model = tiny_classifier(0)
    result = fit(model, toy_train, toy_val(), loss="categorical_crossentropy", run_dir=tmp_path,
                 epochs=5, steps_per_epoch=2, learning_rate=0.0, patience=1, verbose=0)
    assert result.stopped_early and result.epochs_completed == 2 and result.best_epoch == 1
    assert len(read_log(tmp_path / "log.csv")["epoch"]) == 2


def test_a_run_without_a_finite_validation_loss_has_no_best_model_to_keep(tmp_path):
    """NaN validation labels: no epoch improves, so there is no best.keras.  Every system's
    stages call ``fit`` with ``restore_best``: it refuses in one line naming the run folder
    instead of leaving the model with its last weights; without ``restore_best`` the result
    says so and ``require_best`` makes the same check."""
    def nan_val(i):
        images, labels = toy_batch(i)
        return images, labels * float("nan")

    common = dict(loss="categorical_crossentropy", epochs=2, steps_per_epoch=1, learning_rate=1e-3, verbose=0)
    with pytest.raises(ModelError, match=r"no epoch of 2 had a finite monitored value") as error:
        fit(tiny_classifier(0), toy_train, tf.data.Dataset.range(10_000, 10_002).map(nan_val),
            run_dir=tmp_path / "restored", **common)
    assert str(tmp_path / "restored") in str(error.value)
    assert not (tmp_path / "restored" / "best.keras").exists()

    result = fit(tiny_classifier(0), toy_train, tf.data.Dataset.range(10_000, 10_002).map(nan_val),
                 run_dir=tmp_path / "kept", restore_best=False, **common)
    assert result.best_epoch is None and result.epochs_completed == 2 and not result.best_model_path.exists()
    with pytest.raises(ModelError, match=r"no epoch of 2 had a finite monitored value"):
        result.require_best()


def test_a_run_whose_training_loss_turns_nan_stops_there_and_keeps_the_best_epoch(tmp_path, caplog):
    """NaN labels from micro-batch 4 on (epoch 3 of 2-batch epochs): the loss is NaN from
    then on, and so would every later epoch be.  Training stops after epoch 3 with one
    warning naming the run folder, keeps the best finite epoch (1 or 2), and a resume does
    not train the poisoned weights further."""
    def poisoned(start):
        def batch(i):
            images, labels = toy_batch(i)
            return images, labels * tf.where(i >= 4, float("nan"), 1.0)
        return tf.data.Dataset.counter(start).map(batch)

    common = dict(loss="categorical_crossentropy", run_dir=tmp_path, epochs=6, steps_per_epoch=2,
                  learning_rate=1e-2, verbose=0)
    model = tiny_classifier(0)
    with caplog.at_level(logging.WARNING, logger="h2g"):
        result = fit(model, poisoned, toy_val(), **common)
    assert result.diverged_epoch == 3 and result.epochs_completed == 3 and result.stopped_early
    assert result.best_epoch in (1, 2) and math.isfinite(result.best_value)
    assert all(np.isfinite(w).all() for w in model.get_weights())  # the best epoch's weights restored
    assert len(read_log(tmp_path / "log.csv")["epoch"]) == 3
    warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0] and "epoch 3" in warnings[0]
    again = fit(tiny_classifier(0), poisoned, toy_val(), resume=True, **common)
    assert again.epochs_completed == 3 and again.diverged_epoch == 3


def cluster_guided_toy(dropout=0.3):
    """A tiny classifier wrapped with a cluster model on mean colour (3 clusters)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs), name="mean_colour")
    images = [toy_batch(i)[0].numpy() for i in range(6)]
    cluster_model = build_cluster_model(fit_clusterer(images, extractor, n_clusters=3), extractor)
    return cluster_guided(tiny_classifier(0, dropout), cluster_model)


@pytest.mark.slow
def test_cwce_wrapper_trains_and_unwraps(tmp_path):
    wrapper = cluster_guided_toy()
    result = fit(wrapper, toy_train, toy_val(), loss=CWCELoss(n_classes=2), run_dir=tmp_path,
                 epochs=2, steps_per_epoch=16, learning_rate=3e-2, accumulation_steps=2, verbose=0)
    assert np.isfinite(result.history["loss"]).all() and np.isfinite(result.history["val_loss"]).all()
    assert result.history["val_loss"][-1] < np.log(2)  # better than an uninformed classifier
    best = keras.models.load_model(result.best_model_path)
    assert isinstance(best, ClusterGuided)
    x = toy_batch(99)[0].numpy()
    np.testing.assert_allclose(unwrap_classifier(best).predict_on_batch(x),
                               unwrap_classifier(wrapper).predict_on_batch(x), rtol=1e-5, atol=1e-6)
    assert evaluate_classifier(wrapper, toy_val())["accuracy"] > 0.8


@pytest.mark.slow
def test_cwce_wrapper_resumes_exactly(tmp_path):
    kw = dict(loss=CWCELoss(2), steps_per_epoch=3, learning_rate=1e-2, accumulation_steps=2,
              restore_best=False, verbose=0)
    straight = cluster_guided_toy(dropout=0.5)
    fit(straight, toy_train, toy_val(), run_dir=tmp_path / "a", epochs=2, **kw)
    fit(cluster_guided_toy(dropout=0.5), toy_train, toy_val(), run_dir=tmp_path / "b", epochs=1, **kw)
    resumed = cluster_guided_toy(dropout=0.5)
    fit(resumed, toy_train, toy_val(), run_dir=tmp_path / "b", epochs=2, resume=True, **kw)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_bad_options_are_config_errors(tmp_path):
    model = tiny_classifier(0)
    common = dict(loss="categorical_crossentropy", run_dir=tmp_path, epochs=1, steps_per_epoch=1,
                  learning_rate=1e-3, verbose=0)
    with pytest.raises(ConfigError, match="mode"):
        fit(model, toy_train, toy_val(), mode="best", **common)
    with pytest.raises(ConfigError, match="needs validation data"):
        fit(model, toy_train, None, **common)
    with pytest.raises(ConfigError, match="accumulation_steps"):
        fit(model, toy_train, toy_val(), accumulation_steps=0, **common)
    with pytest.raises(ConfigError, match="val_auc"):
        fit(model, toy_train, toy_val(), monitor="val_auc", **common)


@pytest.mark.slow
def test_resuming_another_model_is_a_model_error(tmp_path):
    common = dict(loss="categorical_crossentropy", run_dir=tmp_path, steps_per_epoch=1,
                  learning_rate=1e-3, verbose=0)
    fit(tiny_classifier(0), toy_train, toy_val(), epochs=1, **common)
    with pytest.raises(ModelError, match="last.npz.*cannot resume"):
        fit(tiny_classifier(0, filters=6), toy_train, toy_val(), epochs=2, resume=True, **common)
    # a run folder of an older h2g (last.keras, no last.npz) is refused, not half-resumed
    (tmp_path / "last.npz").rename(tmp_path / "last.keras")
    with pytest.raises(ModelError, match="no last.npz.*cannot resume"):
        fit(tiny_classifier(0), toy_train, toy_val(), epochs=2, resume=True, **common)


@pytest.mark.slow
@pytest.mark.parametrize("outputs", [1, 2])
def test_the_train_step_is_traced_once(tmp_path, outputs):
    """Without a strategy Keras builds the optimizer (and a multi-output loss's trackers)
    inside the first trace of the train step, and tf.function then traces the whole step a
    second time because variables were created in the first: twice the tracing, which
    dominates a short fit.  ``fit`` builds them beforehand, so the step is traced once."""
    model = tiny_classifier(0)
    if outputs == 2:
        model = keras.Model(model.inputs, [model.outputs[0], model.outputs[0]])
    traces = []
    step = model.train_step
    model.train_step = lambda data: (traces.append(1), step(data))[1]
    two = (lambda start: toy_train(start).map(lambda x, y: (x, (y, y)))) if outputs == 2 else toy_train
    val = toy_val().map(lambda x, y: (x, (y, y))) if outputs == 2 else toy_val()
    fit(model, two, val, loss=["categorical_crossentropy"] * outputs if outputs == 2 else "categorical_crossentropy",
        run_dir=tmp_path, epochs=2, steps_per_epoch=2, learning_rate=1e-3, verbose=0)
    assert len(traces) == 1
