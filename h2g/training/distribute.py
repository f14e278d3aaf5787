"""Training on several devices or hosts with ``tf.distribute`` (no scheduler of our own).

- ``--strategy mirrored``: :class:`tf.distribute.MirroredStrategy` over every local GPU,
  or, on a machine without one, over ``replicas`` logical CPU devices (for testing the
  distributed path on a laptop; it is not faster than one CPU device).
- ``--strategy multiworker``: :class:`tf.distribute.MultiWorkerMirroredStrategy` from
  the ``TF_CONFIG`` environment variable (one process per host, each with its local
  devices); see the README for a two-host example.

What changes under a strategy, and what does not:

- The configured batch size is the *global* batch: each step, every replica reads and
  trains on its own contiguous part of it (:func:`distribute_batches`, through
  :func:`h2g.data.dataset.shard_of`), so replicas never read the same patches, and the
  union of their parts is exactly the batch one device would read.  The batch size must
  be a multiple of the number of replicas.
- Losses are means over the global batch (Keras scales each replica's loss by
  1 / replicas and sums the gradients), and batch normalisation is synchronised while
  training (``synchronized=True``: mean and variance over the global batch, the same
  moving statistics on every replica and worker), so a mirrored step equals a
  one-device step on the same global batch (tested).  (Under gradient accumulation each
  micro-batch is still normalised on its own, as on one device.)
- Gradient accumulation stays exact: Keras' own accumulation cannot run under a
  strategy (a synchronisation point inside a conditional, keras-team/keras#20582), so
  :class:`AccumulatingAdam` (and ``AccumulatingSGD``) all-reduces each micro-batch's gradient and then adds it to
  the accumulators, or applies the accumulated mean, in cross-replica context.
- Determinism holds per strategy: the same seed, strategy and replica count give the
  same weights; stage keys name the strategy, so results of different strategies never
  share a cache entry.
- Validation computes ``val_loss`` outside the replicas (:class:`ValidationLoss`).
- Multi-worker: every worker runs the same stages in lockstep; the chief (``chief``, or
  worker 0 when there is none) writes the run folder, the others write theirs under
  ``OUT/_workers/<task>`` (:func:`worker_folder`), as ``tf.distribute`` recommends.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from h2g.core.errors import ConfigError

STRATEGIES = ("none", "mirrored", "multiworker")


def make_strategy(name: str | None, replicas: int | None = None):
    """The ``tf.distribute`` strategy called ``name`` (None for ``"none"``).

    ``mirrored``: all local GPUs, or ``replicas`` (default 2) logical CPU devices when
    there is no GPU; must be called before TensorFlow has initialised its devices.
    ``multiworker``: from ``TF_CONFIG`` (a :class:`ConfigError` when it is unset or not
    valid JSON with ``cluster`` and ``task``)."""
    if name in (None, "none"):
        return None
    if name == "mirrored":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            devices = [f"/gpu:{i}" for i in range(len(gpus) if replicas is None else replicas)]
        else:
            devices = _logical_cpus(2 if replicas is None else replicas)
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def _logical_cpus(n: int) -> list[str]:
    if n < 1:
        raise ConfigError(f"--replicas must be >= 1, got {n}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < n:
            raise ConfigError(f"{n} logical CPU devices were asked for, but TensorFlow has already "
                              f"initialised {have}; choose the strategy before anything runs on TensorFlow") from None
    return [f"/cpu:{i}" for i in range(n)]


def _check_tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError("--strategy multiworker needs TF_CONFIG (the cluster and this worker's task); "
                          "see the README's 'Training on several machines'")
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or "cluster" not in spec or "task" not in spec:
        raise ConfigError("TF_CONFIG must hold 'cluster' and 'task'")
    return spec


def scope(strategy):
    """``strategy.scope()``, or a no-op for no strategy: build and compile models in it."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def replicas(strategy) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def describe(strategy) -> dict:
    """What of the strategy changes results, for stage keys: ``{}`` without one."""
    if strategy is None:
        return {}
    name = "multiworker" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else "mirrored"
    return {"strategy": name, "replicas": replicas(strategy)}


def task(strategy) -> tuple[str | None, int]:
    """``(task type, task id)`` of this process in a multi-worker cluster, else (None, 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy) -> bool:
    """True for the process whose files count: the ``chief`` task, worker 0 of a cluster
    without one, or the only process."""
    kind, index = task(strategy)
    if kind is None:
        return True
    if kind == "chief":
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return kind == "worker" and index == 0 and not has_chief


def worker_folder(out: Path, strategy) -> Path:
    """The chief's ``out``; ``out/_workers/<type>-<id>`` for the other workers."""
    if is_chief(strategy):
        return Path(out)
    kind, index = task(strategy)
    return Path(out) / "_workers" / f"{kind}-{index}"


def distribute_batches(strategy, make: Callable[[tuple[int, int] | None], tf.data.Dataset]):
    """The training data of ``strategy``: ``make(shard)`` builds a dataset of one
    replica's part of each global batch (``shard = (index, count)``, see
    :func:`h2g.data.dataset.shard_of`).  Without a strategy, ``make(None)``.  Under one,
    each worker's input pipeline yields, per step, the parts of its local replicas in
    turn (replica ``r`` of ``R`` reads part ``r``), so no two replicas read the same
    samples of a batch."""
    if strategy is None:
        return make(None)

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        total = context.num_replicas_in_sync
        local = total // context.num_input_pipelines
        first = context.input_pipeline_id * local
        parts = [make((first + r, total)) for r in range(local)]
        if local == 1:
            return parts[0]
        return tf.data.Dataset.choose_from_datasets(parts, tf.data.Dataset.range(local).repeat())

    return strategy.distribute_datasets_from_function(per_worker)


class ValidationLoss(keras.callbacks.Callback):
    """``val_loss`` at the end of each epoch, computed in cross-replica context over
    every validation batch (the mean of the batch losses weighted by batch size, as
    Keras' own validation).  Used instead of Keras' distributed validation, which fails
    when a last, partial batch leaves a replica with no samples (batch normalisation on
    an empty batch); under several workers each worker computes it over all the
    validation data, so all of them take the same early-stopping decisions."""

    def __init__(self, dataset: tf.data.Dataset):
        super().__init__()
        self.dataset = dataset
        self._step = None

    def on_epoch_end(self, epoch, logs=None):
        if self._step is None:
            model = self.model

            @tf.function
            def step(x, y):
                return model.compute_loss(x=x, y=y, y_pred=model(x, training=False), training=False)

            self._step = step
        total, count = 0.0, 0
        for x, y in self.dataset:
            n = int(tf.shape(y if not isinstance(y, (tuple, list)) else y[0])[0])
            total += float(self._step(x, y)) * n
            count += n
        if logs is not None:
            logs["val_loss"] = total / max(count, 1)


@contextlib.contextmanager
def prebuilt(model: keras.Model, strategy, sample: Callable[[], tf.data.Dataset]):
    """Within: ``model`` is ready for ``fit`` under ``strategy`` (a no-op without one):
    its batch normalisation layers are synchronised across replicas (restored after).
    Two Keras 3 steps fail under MultiWorkerMirroredStrategy, so they are worked around:

    - Keras' pre-fit build reduces a first batch across replicas ("Attempt to convert a
      value (PerReplica ...) to a Tensor"): the loss and metrics are built here from
      ``sample()``'s element spec (one replica's batch) and that build is skipped;
    - the logs of each step are reduced across workers with ``MEAN`` over axis 0, which
      fails for scalars ("Invalid reduction dimension 0 for input with 0 dimensions",
      tensorflow/tensorflow#72388): the train and test steps return them as 1-vectors,
      whose mean over the workers is the scalar Keras expects."""
    if strategy is None:
        yield
        return
    from h2g.models import batchnorm_layers

    norms = [layer for layer in batchnorm_layers(model) if not layer.synchronized]
    for layer in norms:  # read when the train step is traced
        layer.synchronized = True
    with strategy.scope():
        model._symbolic_build(data_batch=sample().element_spec)
    patched = {"_maybe_symbolic_build": lambda *args, **kwargs: None}
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        for name in ("train_step", "test_step"):
            step = getattr(model, name)
            patched[name] = (lambda step: lambda data: {
                k: tf.reshape(v, [1]) if getattr(v, "shape", None) is not None and v.shape.rank == 0 else v
                for k, v in step(data).items()})(step)
    for name, value in patched.items():
        object.__setattr__(model, name, value)
    try:
        yield
    finally:
        for name in patched:
            object.__delattr__(model, name)
        for layer in norms:
            layer.synchronized = False


class _CrossReplicaAccumulation:
    """Gradient accumulation that also runs under a ``tf.distribute`` strategy (mixed into
    a Keras optimizer class).

    Each micro-batch's gradients are summed over the replicas (each replica's loss is
    already scaled by 1 / replicas, so the sum is the gradient of the global mean), then,
    in cross-replica context, added to the accumulators or - every
    ``gradient_accumulation_steps``-th micro-batch - averaged with them and applied.
    Without a strategy, or without accumulation, it is the Keras optimizer.  Weight
    decay is not supported in that combination (a clear error)."""

    def _backend_apply_gradients(self, grads, trainable_variables):
        context = tf.distribute.get_replica_context()
        if not self.gradient_accumulation_steps or context is None or not tf.distribute.has_strategy():
            return super()._backend_apply_gradients(grads, trainable_variables)
        if self.weight_decay:
            raise ConfigError("gradient accumulation under a distribution strategy does not support weight decay")
        steps = self.gradient_accumulation_steps
        accumulators = [self._accumulated_gradients[self._get_variable_index(v)].value
                        for v in trainable_variables]
        variables = [v.value for v in trainable_variables]

        def cross_replica(strategy, grads):
            grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]

            def update():
                total = self._clip_gradients([(g + a) / steps for g, a in zip(grads, accumulators)])
                self._distributed_tf_update_step(strategy, list(zip(total, variables)), self.learning_rate)
                for a in accumulators:
                    strategy.extended.update(a, lambda v: v.assign(tf.zeros_like(v)), group=False)

            def accumulate():
                for g, a in zip(grads, accumulators):
                    strategy.extended.update(a, lambda v, g: v.assign_add(g), args=(g,), group=False)

            tf.cond((self._iterations + 1) % steps == 0, update, accumulate)

        context.merge_call(cross_replica, args=(list(grads),))


@keras.saving.register_keras_serializable(package="h2g")
class AccumulatingAdam(_CrossReplicaAccumulation, keras.optimizers.Adam):
    """Adam with :class:`_CrossReplicaAccumulation`."""


@keras.saving.register_keras_serializable(package="h2g")
class AccumulatingSGD(_CrossReplicaAccumulation, keras.optimizers.SGD):
    """SGD with :class:`_CrossReplicaAccumulation`."""


OPTIMIZERS = {"adam": (keras.optimizers.Adam, AccumulatingAdam), "sgd": (keras.optimizers.SGD, AccumulatingSGD)}


def make_optimizer(name: str, learning_rate: float, accumulation_steps: int = 1, strategy=None, *,
                   momentum: float = 0.0, weight_decay: float | None = None) -> keras.optimizers.Optimizer:
    """``"adam"`` or ``"sgd"`` (``momentum`` for SGD; ``weight_decay`` for either, Keras'
    decoupled decay), accumulating over ``accumulation_steps`` micro-batches.  The Keras
    class unless both a strategy and accumulation are in use, when it is the
    ``Accumulating*`` variant (models saved with it then load only after
    ``import h2g.training.distribute``, which registers it)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    steps = accumulation_steps if accumulation_steps > 1 else None
    plain, accumulating = OPTIMIZERS[name]
    kind = accumulating if strategy is not None and steps else plain
    kw = {"momentum": momentum} if name == "sgd" else {}
    return kind(learning_rate=learning_rate, gradient_accumulation_steps=steps,
                weight_decay=weight_decay or None, **kw)


def adam(learning_rate: float, accumulation_steps: int = 1, strategy=None) -> keras.optimizers.Optimizer:
    """The package's default optimizer: :func:`make_optimizer` ``("adam", ...)``."""
    return make_optimizer("adam", learning_rate, accumulation_steps, strategy)
