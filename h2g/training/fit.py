"""One generic training loop (``keras.Model.fit``) for patch classifiers and refinement
networks (paper Section 3.4): Adam, gradient accumulation, best-on-validation and
resumable checkpoints, CSV log, training curves, early stopping, determinism.

Run folder (``run_dir``)::

    last.npz       every variable after the last completed epoch: the model's weights, its
                   random-number generator states (Dropout, ...) and the optimizer's state
    best.npz       the same at the best monitored epoch
    best.keras     the model at its best monitored epoch, saved whole (optimizer included),
                   written once, when training ends
    state.json     {"epoch", "best_value", "best_epoch", "wait", "stopped", "diverged_epoch"};
                   written last
    log.csv        one row per epoch (Keras' CSVLogger)
    curves.png     training and validation curves, drawn every 30 s at most (first 30 s after the
                   start) and at the end

The per-epoch checkpoints are plain arrays in the model's own variable order (a resumed run
rebuilds the same model): writing a ``.keras`` file walks every layer's saveables and took
0.6-1.6 s an epoch for the smoke refiners, the arrays a fifth of that.

Data: ``train_data(start_batch)`` returns an infinite ``tf.data.Dataset`` whose first
element is global micro-batch number ``start_batch``; epoch ``e`` (0-based) consumes
micro-batches ``e * steps_per_epoch ...``, so a resumed run asks for
``train_data(e * steps_per_epoch)`` and sees the same batches an uninterrupted run sees.
``val_data`` is a finite dataset yielding the same batches every time.

Gradient accumulation uses Keras 3's ``gradient_accumulation_steps`` of the optimizer:
the gradients of N consecutive micro-batches are summed and the update uses their
average, so for a loss that is a mean over samples, N micro-batches of B samples make
the same update as one batch of N*B samples (tested for SGD and Adam).  Adam's step
count (bias correction) counts updates, not micro-batches; ``steps_per_epoch`` counts
micro-batches, and an accumulation window may span an epoch boundary (the accumulators
are part of the optimizer state in ``last.npz``).  BatchNormalization is NOT
accumulated: each micro-batch is normalised with its own statistics (B samples, not
N*B) and the moving mean/variance update after every micro-batch.  CWCE is a per-batch
loss: under accumulation the update averages the CWCE of each micro-batch.

Distribution: with ``strategy`` (:mod:`h2g.training.distribute`) the model must have
been built in ``strategy.scope()``; ``train_data(start_batch, shard)`` is then called once
per replica with that replica's ``shard`` of each global batch, and gradient
accumulation runs through :class:`~h2g.training.distribute.AccumulatingAdam`.

Determinism: ``fit`` calls ``keras.utils.set_random_seed(seed)`` and (with
``deterministic=True``) ``tf.config.experimental.enable_op_determinism()``.  Model
weights are initialised by the caller: seed before building the model.  Under op
determinism tf.data runs ``map`` functions holding stateful ops serially and drops
prefetching: readers written with ``tf.numpy_function`` should pass ``stateful=False``
(true of readers that depend only on their inputs) to stay parallel.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from h2g.core.atomic import replace_atomically
from h2g.core.errors import ConfigError, ModelError
from h2g.training import distribute
from h2g.training.losses import unwrap_classifier

_log = logging.getLogger("h2g")
BEST, BEST_ARRAYS, LAST, STATE, LOG, CURVES = (
    "best.keras", "best.npz", "last.npz", "state.json", "log.csv", "curves.png")
#: after an epoch, curves.png is redrawn only when this many seconds have passed since the last drawing
CURVES_EVERY_S = 30.0


@dataclass
class FitResult:
    """What :func:`fit` leaves behind.  Epochs are 1-based; ``history`` holds every
    completed epoch of the run (including those before a resume), from ``log.csv``."""

    run_dir: Path
    history: dict[str, list[float]]
    epochs_completed: int
    best_epoch: int | None
    best_value: float | None
    stopped_early: bool
    diverged_epoch: int | None = None  # the epoch whose training loss was not finite (training stopped there)

    @property
    def best_model_path(self) -> Path:
        return self.run_dir / BEST

    def require_best(self) -> "FitResult":
        """This result, or a :class:`ModelError` when no epoch had a finite monitored value
        (a loss that was NaN throughout): then there is no best model to keep."""
        if self.best_epoch is None:
            raise ModelError(f"{self.run_dir}: no epoch of {self.epochs_completed} had a finite monitored value "
                             f"(see log.csv): nothing to keep; lower the learning rate or check the data")
        return self

    @property
    def last_checkpoint_path(self) -> Path:
        """The variables after the last completed epoch (arrays, see the module docstring)."""
        return self.run_dir / LAST


def _fresh_state() -> dict:
    return {"epoch": 0, "best_value": None, "best_epoch": None, "wait": 0, "stopped": False, "diverged_epoch": None}


def _variable_groups(model: keras.Model) -> dict[str, list]:
    """The variables a checkpoint holds, by group: the model's weights, its other variables
    (the SeedGenerator states; Keras does not count them as weights) and the optimizer's."""
    weights = {id(w) for w in model.weights}
    return {"weight": list(model.weights), "rng": [v for v in model.variables if id(v) not in weights],
            "optimizer": list(model.optimizer.variables)}


def save_variables(path: str | os.PathLike, model: keras.Model) -> None:
    """Every variable of ``model`` and of its optimizer as one uncompressed ``.npz``
    (``weight_<i>``, ``rng_<i>``, ``optimizer_<i>``), written atomically."""
    arrays = {f"{group}_{i}": np.asarray(v.numpy())
              for group, variables in _variable_groups(model).items() for i, v in enumerate(variables)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append .npz to the name
            np.savez(fh, **arrays)

    replace_atomically(path, write)


def load_variables(path: str | os.PathLike, model: keras.Model) -> None:
    """Assign the arrays :func:`save_variables` wrote to ``model`` and its (built)
    optimizer; :class:`ModelError` naming the file when they do not fit this model."""
    groups = _variable_groups(model)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {g: sum(1 for k in data.files if k.rsplit("_", 1)[0] == g) for g in groups}
            if any(stored[g] != len(v) for g, v in groups.items()):
                raise ModelError(
                    f"{path}: cannot resume this model from it: the file holds "
                    + ", ".join(f"{stored[g]} {g}" for g in groups) + " variables, the model has "
                    + ", ".join(f"{len(v)} {g}" for g, v in groups.items()) + "; is this the same model?")
            values = {g: [data[f"{g}_{i}"] for i in range(len(v))] for g, v in groups.items()}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read this checkpoint: {exc}") from None
    pairs = [(v, a) for g, variables in groups.items() for v, a in zip(variables, values[g])]
    for variable, value in pairs:
        if tuple(variable.shape) != value.shape:
            raise ModelError(f"{path}: cannot resume this model from it: {variable.path} has shape "
                             f"{tuple(variable.shape)}, the file {value.shape}; is this the same model?")
    for variable, value in pairs:
        variable.assign(value)


def read_log(path: str | os.PathLike) -> dict[str, list[float]]:
    """``log.csv`` as ``{column: values}`` (the ``epoch`` column as 1-based ints).
    Columns CSVLogger fills with "NA" only (``val_*`` without validation) are dropped."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [c for c in (rows[0].keys() if rows else ()) if any(r[c] != "NA" for r in rows)]
    history = {c: [float("nan") if r[c] == "NA" else float(r[c]) for r in rows] for c in columns}
    if "epoch" in history:
        history["epoch"] = [int(e) + 1 for e in history["epoch"]]
    return history


def plot_curves(history: dict[str, list[float]], path: str | os.PathLike) -> None:
    """One panel per quantity (``loss``, each metric), training and validation together;
    ``history`` as from :func:`read_log` or ``keras.callbacks.History.history``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    names = [k for k in history if k not in ("epoch", "learning_rate") and not k.startswith("val_")]
    epochs = history.get("epoch") or range(1, len(history["loss"]) + 1)
    fig = Figure(figsize=(4.5 * len(names), 3.5), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        ax.plot(epochs, history[name], marker=".", label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.savefig(path, dpi=100)


class _Checkpointer(keras.callbacks.Callback):
    """Per epoch: best variables on ``monitor``, last checkpoint + state.json, early
    stopping after ``patience`` epochs without improvement, curves (at most every
    :data:`CURVES_EVERY_S`, and when training ends).  (Keras' ModelCheckpoint/EarlyStopping
    reset their state at the start of every ``fit``, so they cannot continue a resumed run.)"""

    def __init__(self, run_dir: Path, state: dict, monitor: str, mode: str, patience: int | None):
        super().__init__()
        self.run_dir, self.state = run_dir, state
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self._drawn = 0.0  # time.monotonic() of the last drawing (or of the start of training)

    def _improved(self, value: float) -> bool:
        best = self.state["best_value"]
        if math.isnan(value):
            return False
        return best is None or (value < best if self.mode == "min" else value > best)

    def _draw(self) -> None:
        plot_curves(read_log(self.run_dir / LOG), self.run_dir / CURVES)
        self._drawn = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise ConfigError(f"{self.run_dir}: monitor {self.monitor!r} is not among the "
                              f"logged quantities {sorted(logs)}")
        value = float(logs[self.monitor])
        state = self.state
        state["epoch"] = epoch + 1
        if self._improved(value):
            state.update(best_value=value, best_epoch=epoch + 1, wait=0)
            save_variables(self.run_dir / BEST_ARRAYS, self.model)
        else:
            state["wait"] += 1
        if self.patience is not None and state["wait"] >= self.patience:
            state["stopped"] = True
            self.model.stop_training = True
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):  # the weights are no longer numbers
            state.update(stopped=True, diverged_epoch=epoch + 1)
            self.model.stop_training = True
            kept = (f"the best epoch ({state['best_epoch']}) is kept" if state["best_epoch"] is not None
                    else "no epoch had a finite monitored value")
            _log.warning("%s: the training loss of epoch %d is not finite (diverged): training stopped, %s; "
                         "lower the learning rate or check the data", self.run_dir, epoch + 1, kept)
        save_variables(self.run_dir / LAST, self.model)
        replace_atomically(self.run_dir / STATE, lambda p: p.write_text(json.dumps(state, indent=2)))
        if time.monotonic() - self._drawn >= CURVES_EVERY_S:
            self._draw()

    def on_train_begin(self, logs=None):
        self._drawn = time.monotonic()  # the first drawing 30 s in: a run shorter than that draws once, at the end

    def on_train_end(self, logs=None):
        if (self.run_dir / LOG).is_file():
            self._draw()


def _restore(model: keras.Model, run_dir: Path) -> dict:
    """Load the weights, RNG and optimizer states of ``last.npz`` into ``model``
    (compiled); truncate ``log.csv`` to the checkpoint's epoch; return the state."""
    state = json.loads((run_dir / STATE).read_text())
    if not (run_dir / LAST).is_file():
        raise ModelError(f"{run_dir}: {STATE} but no {LAST} (a run folder of an older h2g, which kept "
                         f"last.keras): cannot resume from it; train again without resuming")
    model.optimizer.build(model.trainable_variables)
    load_variables(run_dir / LAST, model)
    log = run_dir / LOG
    if log.is_file():
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join(lines[: 1 + state["epoch"]]))
    return state


def _write_best_model(model: keras.Model, run_dir: Path, restore_best: bool) -> None:
    """``best.keras`` from ``best.npz``; the model then keeps the best variables when
    ``restore_best``, else gets back those it had."""
    variables = [v for group in _variable_groups(model).values() for v in group]
    current = None if restore_best else [v.numpy() for v in variables]
    load_variables(run_dir / BEST_ARRAYS, model)
    replace_atomically(run_dir / BEST, model.save)
    if current is not None:
        for variable, value in zip(variables, current):
            variable.assign(value)


def dynamic_batch(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with the batch dimension of every element made unknown.

    Readers that set a static batch size (``set_shape`` after ``tf.numpy_function``) make
    TensorFlow pick CPU kernels whose results depend on thread timing, even under
    ``enable_op_determinism``: the same seed and the same batches then gave different
    MobileNetV2 weights from run to run.  With the batch dimension unknown, training is
    bit-for-bit repeatable."""
    def relax(tensor):
        if tensor.shape.rank:
            return tf.compat.v1.placeholder_with_default(tensor, [None, *tensor.shape[1:]])
        return tensor

    return dataset.map(lambda *parts: tf.nest.map_structure(relax, parts if len(parts) > 1 else parts[0]))


def fit(model: keras.Model, train_data: Callable[[int], tf.data.Dataset],
        val_data: tf.data.Dataset | None, *, loss, run_dir: str | os.PathLike, epochs: int,
        steps_per_epoch: int, learning_rate: float, accumulation_steps: int = 1,
        monitor: str = "val_loss", mode: str = "min", patience: int | None = None,
        resume: bool = False, seed: int = 0, metrics=None, verbose="auto",
        restore_best: bool = True, deterministic: bool = True, strategy=None,
        optimizer: str = "adam", momentum: float = 0.0, weight_decay: float | None = None) -> FitResult:
    """Train ``model`` with Adam(``learning_rate``) (or SGD) on ``loss`` for ``epochs`` epochs of
    ``steps_per_epoch`` micro-batches, accumulating gradients over ``accumulation_steps``
    micro-batches; see the module docstring for the run folder and data contract.

    ``monitor``/``mode`` choose the best epoch (and early stopping with ``patience``
    epochs without improvement).  An epoch whose training loss is not finite (diverged:
    its weights are no longer numbers) stops training there with a warning, and the run
    counts as finished (``FitResult.diverged_epoch``).  ``resume=True`` continues from
    ``last.npz`` when the run folder has one (the same model must be passed, built the
    same way) and gives the same weights as an uninterrupted run; a finished run is not
    trained further.  With
    ``restore_best`` the model ends with the weights of ``best.keras``, and a run in which
    no epoch had a finite monitored value (a NaN loss throughout) is a :class:`ModelError`
    naming the run folder rather than a model silently left with its last weights; without
    it, :meth:`FitResult.require_best` makes the same check.  ``verbose`` is
    passed to Keras (its progress bar).  ``deterministic=False`` skips
    ``enable_op_determinism`` (some GPU kernels have no deterministic version).
    ``optimizer``: ``"adam"`` (default) or ``"sgd"`` with ``momentum``; ``weight_decay``
    for either (:func:`h2g.training.distribute.make_optimizer`).
    ``strategy``: a ``tf.distribute`` strategy (see the module docstring); the run folder
    is written by every process that calls ``fit``: give non-chief workers their own
    (:func:`h2g.training.distribute.worker_folder`).
    """
    if epochs < 1 or steps_per_epoch < 1 or accumulation_steps < 1:
        raise ConfigError(f"epochs ({epochs}), steps_per_epoch ({steps_per_epoch}) and "
                          f"accumulation_steps ({accumulation_steps}) must be >= 1")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', not {mode!r}")
    if val_data is None and monitor.startswith("val_"):
        raise ConfigError(f"monitor {monitor!r} needs validation data")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    with distribute.scope(strategy):
        model.compile(optimizer=distribute.make_optimizer(optimizer, learning_rate, accumulation_steps, strategy,
                                                          momentum=momentum, weight_decay=weight_decay),
                      loss=loss, metrics=metrics)

    if resume and (run_dir / STATE).is_file():
        with distribute.scope(strategy):
            state = _restore(model, run_dir)
    else:  # a fresh run: no stale checkpoint of an earlier run may be resumed later
        for name in (STATE, LAST, BEST_ARRAYS, BEST, LOG, CURVES, "last.keras", "last_rng.npz"):
            (run_dir / name).unlink(missing_ok=True)
        state = _fresh_state()
    start = state["epoch"]
    trains = start < epochs and not state["stopped"]
    if trains:
        callbacks = [keras.callbacks.CSVLogger(str(run_dir / LOG), append=start > 0),
                     _Checkpointer(run_dir, state, monitor, mode, patience)]
        validation = None if val_data is None else dynamic_batch(val_data)
        if strategy is None:
            train = dynamic_batch(train_data(start * steps_per_epoch))
            # Without a strategy Keras builds the optimizer (and a multi-output loss's
            # trackers) inside the first trace of the train step; tf.function sees
            # variables created there and traces the whole step a second time.  Built here
            # from the element spec, the step is traced once (same weights, half the
            # tracing: 72 s -> 35 s for DoubleUNet's first epoch on 2 cores).
            model._symbolic_build(data_batch=train.element_spec)
        else:
            train = distribute.distribute_batches(
                strategy, lambda shard: dynamic_batch(train_data(start * steps_per_epoch, shard)))
            if validation is not None:
                if monitor.startswith("val_") and monitor != "val_loss":
                    raise ConfigError(f"under a distribution strategy validation reports val_loss only, "
                                      f"not {monitor!r}")
                callbacks.insert(0, distribute.ValidationLoss(validation))
                validation = None
        with distribute.prebuilt(model, strategy, lambda: dynamic_batch(train_data(0, (0, strategy.num_replicas_in_sync)))):
            model.fit(train, validation_data=validation,
                      epochs=epochs, initial_epoch=start, steps_per_epoch=steps_per_epoch,
                      callbacks=callbacks, verbose=verbose, shuffle=False)
    if (run_dir / BEST_ARRAYS).is_file():
        with distribute.scope(strategy):
            if trains or not (run_dir / BEST).is_file():
                _write_best_model(model, run_dir, restore_best)
            elif restore_best:
                load_variables(run_dir / BEST_ARRAYS, model)
    result = FitResult(run_dir=run_dir, history=read_log(run_dir / LOG),
                       epochs_completed=state["epoch"], best_epoch=state["best_epoch"],
                       best_value=state["best_value"], stopped_early=state["stopped"],
                       diverged_epoch=state.get("diverged_epoch"))
    return result.require_best() if restore_best else result


def evaluate_classifier(model: keras.Model, val_data: tf.data.Dataset) -> dict[str, float]:
    """Patch-level metrics of a classifier (or the classifier inside a
    :class:`h2g.training.losses.ClusterGuided`) over ``val_data`` yielding ``(patches, one-hot
    labels)``: mean categorical cross-entropy ``loss``, ``accuracy``, and tumour (class
    1) ``recall``/``precision`` of the arg-max prediction, plus ``n_patches``."""
    from sklearn.metrics import (
        accuracy_score,
        log_loss,
        precision_recall_fscore_support,
    )

    classifier = unwrap_classifier(model)
    labels, probs = [], []
    for batch in val_data:
        x, y = batch[0], batch[1]
        probs.append(np.asarray(classifier.predict_on_batch(x), dtype=np.float64))
        labels.append(np.argmax(np.asarray(y), axis=-1))
    if not probs:
        raise ConfigError("evaluate_classifier got an empty validation dataset")
    p, t = np.concatenate(probs), np.concatenate(labels)
    p = p / p.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only to ~1e-7
    predicted = np.argmax(p, axis=-1)
    precision, recall, _, _ = precision_recall_fscore_support(t, predicted, labels=[1],
                                                              zero_division=0)
    return {
        "loss": float(log_loss(t, p, labels=list(range(p.shape[1])))),
        "accuracy": float(accuracy_score(t, predicted)),
        "recall": float(recall[0]),
        "precision": float(precision[0]),
        "n_patches": int(len(t)),
    }
