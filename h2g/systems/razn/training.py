"""RAZN's training loop (Dong et al., Algorithm 1, m = 1, r = 2) and the same loop for
the four baselines, with exact checkpoint / resume, a log and curves.

Per step, on a batch of regions ``x0`` (B, S, S, 3), their zooms ``x1`` (B, 2S, 2S, 3)
and the label map ``y`` (B, 2S, 2S) of ``x1`` (255 = unannotated, ignored):

1. ``J0`` (per region): the coarse network on ``x0``, enlarged to the fine grid
   (nearest neighbour, as at inference), against ``y``; ``J1``: the fine network on
   the four patches of ``x1``, stitched, against ``y`` (Eq. 1, the mean cross-entropy
   over the region's annotated pixels);
2. ``a`` ~ Bernoulli(``p~``) with ``p~ = alpha p + (1 - alpha)(1 - p)`` (Eq. 5),
   ``p`` = the policy's output on ``x0`` (Eq. 2); the uniform draws come from
   ``tf.random.stateless_uniform`` seeded by (seed, step), so a run is repeatable and a
   resumed run draws what the uninterrupted one drew;
3. reward ``R = a (J0 - J1) / max(J0, reward_floor)``: zooming is rewarded when the fine scale *lowers*
   the loss.  **The printed Eq. 4 has the difference the other way round**
   (``(J1 - J0) / J0``, and the text after it says the reward is positive when
   ``J1 > J0``): maximising that reward would teach the policy to zoom where zooming
   hurts, against the paper's own motivation ("define the reward such that it minimizes
   the segmentation loss"); we implement the sign that does what the paper intends.
   The floor on the denominator (``reward_floor``, default 0.05 nats; 0 = the paper's
   form) is ours: a region the coarse network already gets nearly right (J0 -> 0)
   otherwise gives a reward of -1e3 and swamps the batch's policy gradient;
4. REINFORCE update of the policy every step: minimise
   ``-mean(R log(a p~ + (1 - a)(1 - p~)))`` (Eq. 6-7, ``R`` held constant);
5. the fine network is updated on the mean ``J1`` of the regions with ``a = 1``, the
   coarse network on the mean ``J0`` of those with ``a = 0`` (a network none of whose
   regions were drawn is not updated that step).  **Departure (optional):**
   ``coarse_regions="all"`` updates the coarse network on the mean ``J0`` of *every*
   region, and ``fine_regions="all"`` the fine one on every region's ``J1``; the paper's
   rule is ``"unzoomed"`` / ``"zoomed"``.  At inference the coarse network segments every
   region the policy does not zoom, which after training is not the set its draws gave
   it; trained on all regions (and started from the baselines' initial weights, as
   :meth:`h2g.systems.razn.pipeline.Pipeline.build` does) it is Scale 1's network, so a
   RAZN that never zooms is Scale 1, and the policy's decisions are all that differ.
   Both losses are computed on every region anyway (for the reward), so it costs nothing.

Each network has its own Adam; the learning rate is ``lr * decay_rate ** (step //
decay_steps)`` on the global step (the paper: 0.01, x0.1 every 50000 iterations).  The
baselines (:class:`UnitTrainer`) train their one unit model with the same optimizer,
schedule, data and step count on the mean cross-entropy of their output (MS: the sum of
the coarse-scale and fine-scale losses of the shared network, "multi-scale training";
Attention: the fused output's loss plus each scale's, Chen et al.'s extra supervision).

Run folder::

    checkpoint.npz   every network's and optimizer's variables at ``state.json``'s step
    state.json       {"step": n}; written last
    log.csv          one row per checkpoint interval (means over its steps)
    curves.png       the log's columns against the step

A checkpoint is written every ``checkpoint_every`` steps and at the end; ``resume``
continues from it and gives the same weights as an uninterrupted run (tested).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from h2g.core.atomic import replace_atomically, write_json
from h2g.core.errors import ConfigError, ModelError
from h2g.io.classes import IGNORE
from h2g.models.razn import enlarge, split_zoom, stitch_zoom

CHECKPOINT, STATE, LOG, CURVES = "checkpoint.npz", "state.json", "log.csv", "curves.png"
EPS = 1e-6
COARSE_REGIONS = ("unzoomed", "all")  # the coarse net's training regions: Algorithm 1's, or every region
FINE_REGIONS = ("zoomed", "all")
REWARD_MODES = ("training", "inference")  # the networks' mode (batch norm) when the reward's losses are taken


def masked_cross_entropy(probs, labels, ignore: int = IGNORE):
    """Per-sample mean cross-entropy over the annotated pixels (Eq. 1): ``probs``
    (B, H, W, C) softmax, ``labels`` (B, H, W) class indices, ``ignore`` skipped; a
    sample without an annotated pixel gets 0."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(tf.not_equal(labels, ignore), tf.float32)
    safe = tf.where(labels == ignore, 0, labels)
    picked = tf.gather(probs, safe, axis=-1, batch_dims=3)
    nll = -tf.math.log(tf.clip_by_value(picked, 1e-7, 1.0)) * valid
    return tf.reduce_sum(nll, axis=[1, 2]) / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0)


def region_weights(a, coarse_all: bool = False, fine_all: bool = False):
    """``(w0, w1)``: which regions of a batch of actions ``a`` (1 = zoom) the coarse and
    the fine network are trained on (module doc, step 5): Algorithm 1's ``1 - a`` and
    ``a``, or every region (ones) for the one trained on all regions."""
    ones = tf.ones_like(a)
    return (ones if coarse_all else 1.0 - a), (ones if fine_all else a)


def region_losses(coarse, fine, x0, x1, y, training: bool = True):
    """``(J0, J1)`` per region (Eq. 1 on the fine grid): the coarse network on ``x0``
    enlarged, the fine network on the four patches of ``x1`` stitched, against ``y``."""
    j0 = masked_cross_entropy(enlarge(coarse(x0, training=training)), y)
    j1 = masked_cross_entropy(stitch_zoom(fine(split_zoom(x1), training=training)), y)
    return j0, j1


def bounded(p, alpha: float):
    """Eq. 5 (in TensorFlow): ``alpha p + (1 - alpha)(1 - p)``."""
    return alpha * p + (1.0 - alpha) * (1.0 - p)


def learning_rate(step: int, base: float, decay_steps: int, decay_rate: float) -> float:
    """Step decay on the global step."""
    return float(base * decay_rate ** (step // max(1, decay_steps)))


class _Trainer:
    """Networks, their optimizers, the checkpoint and the log (subclasses: the step)."""

    names: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()

    def __init__(self, models: dict, *, lr: float = 0.01, decay_steps: int = 50_000, decay_rate: float = 0.1,
                 seed: int = 0):
        self.models = models
        self.optimizers = {name: keras.optimizers.Adam(learning_rate=lr) for name in models}
        for name, model in models.items():
            self.optimizers[name].build(model.trainable_variables)
        self.lr, self.decay_steps, self.decay_rate, self.seed = lr, decay_steps, decay_rate, seed

    # ---- checkpoint
    def _variables(self) -> list:
        out = []
        for name in self.models:
            out += list(self.models[name].variables) + list(self.optimizers[name].variables)
        return out

    def save(self, run_dir: Path, step: int) -> None:
        values = [v.numpy() for v in self._variables()]
        replace_atomically(run_dir / CHECKPOINT, lambda p: np.savez(p, *values))
        write_json(run_dir / STATE, {"step": int(step)})

    def restore(self, run_dir: Path) -> int:
        state = json.loads((run_dir / STATE).read_text())
        variables = self._variables()
        with np.load(run_dir / CHECKPOINT) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(values) != len(variables):
            raise ModelError(f"{run_dir / CHECKPOINT}: {len(values)} arrays for {len(variables)} variables; "
                             "is this the same design and configuration?")
        for variable, value in zip(variables, values):
            if tuple(variable.shape) != value.shape:
                raise ModelError(f"{run_dir / CHECKPOINT}: {variable.path} has shape {tuple(variable.shape)}, "
                                 f"the checkpoint {value.shape}")
            variable.assign(value)
        return int(state["step"])

    def _apply(self, name: str, grads, step: int) -> None:
        model, optimizer = self.models[name], self.optimizers[name]
        if not model.trainable_variables:
            return
        optimizer.learning_rate = learning_rate(step, self.lr, self.decay_steps, self.decay_rate)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    def step(self, x0, x1, y, step: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- the loop
    def fit(self, batches: Callable[[int], Iterable], *, steps: int, run_dir, checkpoint_every: int = 1000,
            resume: bool = False, progress: bool = True) -> dict:
        """Train to ``steps`` steps; ``batches(start)`` yields ``({"x0", "x1"}, y)``
        batches from global batch number ``start`` on.  Returns the log as columns.  A step
        whose logged losses are not finite (diverged) is a :class:`ModelError` naming the run
        folder; the last checkpoint written before it is left as it was."""
        from tqdm.auto import tqdm

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume and (run_dir / STATE).is_file():
            start = self.restore(run_dir)
            _truncate_log(run_dir / LOG, start)
        else:
            for name in (CHECKPOINT, STATE, LOG, CURVES):
                (run_dir / name).unlink(missing_ok=True)
        if start < steps:
            sums: dict[str, float] = {}
            count = 0
            data = iter(batches(start))
            with tqdm(total=steps, initial=start, unit="step", desc="train", disable=not progress,
                      leave=False) as bar:
                for step in range(start, steps):
                    inputs, y = next(data)
                    got = self.step(inputs["x0"], inputs["x1"], y, step)
                    bad = sorted(k for k, v in got.items() if not math.isfinite(v))
                    if bad:  # the networks' weights are no longer numbers: stop before they are saved
                        raise ModelError(
                            f"{run_dir}: training diverged at step {step + 1}: {', '.join(bad)} is not finite; "
                            f"{_kept_checkpoint(run_dir)}; lower the learning rate or check the data")
                    for k, v in got.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                    bar.update(1)
                    if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                        row = {"step": step + 1, "learning_rate": learning_rate(step, self.lr, self.decay_steps,
                                                                                self.decay_rate),
                               **{k: v / count for k, v in sums.items()}}
                        _append_log(run_dir / LOG, row)
                        self.save(run_dir, step + 1)
                        plot_log(run_dir / LOG, run_dir / CURVES)
                        sums, count = {}, 0
        return read_log(run_dir / LOG)


def _kept_checkpoint(run_dir: Path) -> str:
    if (run_dir / STATE).is_file():
        return f"the checkpoint of step {json.loads((run_dir / STATE).read_text())['step']} is kept"
    return "no checkpoint was written"


class RaznTrainer(_Trainer):
    """Algorithm 1 (module doc) on ``policy`` (image -> p (B, 1)), ``coarse`` and ``fine``
    (image (B, S, S, 3) -> softmax (B, S, S, C))."""

    def __init__(self, policy, coarse, fine, *, alpha: float = 0.8, reward_floor: float = 0.05,
                 coarse_regions: str = "unzoomed", fine_regions: str = "zoomed", reward_mode: str = "training",
                 **kw):
        if coarse_regions not in COARSE_REGIONS or fine_regions not in FINE_REGIONS:
            raise ConfigError(f"coarse_regions must be one of {COARSE_REGIONS} and fine_regions one of "
                              f"{FINE_REGIONS}, got {coarse_regions!r} and {fine_regions!r}")
        if reward_mode not in REWARD_MODES:
            raise ConfigError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        super().__init__({"policy": policy, "coarse": coarse, "fine": fine}, **kw)
        self.alpha = float(alpha)
        self.reward_floor = max(float(reward_floor), EPS)
        self.coarse_all, self.fine_all = coarse_regions == "all", fine_regions == "all"
        self.inference_reward = reward_mode == "inference"
        self._compute = tf.function(self._gradients, reduce_retracing=True)

    def _gradients(self, x0, x1, y, seed):
        policy, coarse, fine = self.models["policy"], self.models["coarse"], self.models["fine"]
        if self.inference_reward:  # the losses of the predictions inference makes (batch norm's moving statistics)
            r0, r1 = region_losses(coarse, fine, x0, x1, y, training=False)
        with tf.GradientTape(persistent=True) as tape:
            p = policy(x0, training=True)[:, 0]
            j0, j1 = region_losses(coarse, fine, x0, x1, y, training=True)
            if not self.inference_reward:
                r0, r1 = j0, j1
            pt = bounded(p, self.alpha)
            u = tf.random.stateless_uniform(tf.shape(p), seed)
            a = tf.cast(u < tf.stop_gradient(pt), tf.float32)
            reward = tf.stop_gradient(a * (r0 - r1) / tf.maximum(r0, self.reward_floor))
            log_prob = tf.math.log(tf.clip_by_value(a * pt + (1.0 - a) * (1.0 - pt), 1e-7, 1.0))
            policy_loss = -tf.reduce_mean(reward * log_prob)
            w0, w1 = region_weights(a, self.coarse_all, self.fine_all)
            n0, n1 = tf.reduce_sum(w0), tf.reduce_sum(w1)
            fine_loss = tf.reduce_sum(w1 * j1) / tf.maximum(n1, 1.0)
            coarse_loss = tf.reduce_sum(w0 * j0) / tf.maximum(n0, 1.0)
        grads = {
            "policy": tape.gradient(policy_loss, policy.trainable_variables),
            "coarse": tape.gradient(coarse_loss, coarse.trainable_variables),
            "fine": tape.gradient(fine_loss, fine.trainable_variables),
        }
        del tape
        logs = {"policy_loss": policy_loss, "j0": tf.reduce_mean(j0), "j1": tf.reduce_mean(j1),
                "reward": tf.reduce_mean(reward), "p": tf.reduce_mean(p), "zoom_rate": tf.reduce_mean(a)}
        return grads, logs, n0, n1

    def step(self, x0, x1, y, step: int) -> dict:
        seed = tf.constant([self.seed, step], tf.int64)
        grads, logs, n0, n1 = self._compute(x0, x1, y, seed)
        self._apply("policy", grads["policy"], step)
        if float(n1) > 0:
            self._apply("fine", grads["fine"], step)
        if float(n0) > 0:
            self._apply("coarse", grads["coarse"], step)
        return {k: float(v) for k, v in logs.items()}


class UnitTrainer(_Trainer):
    """A baseline's unit model (:func:`h2g.models.razn.unit_model`) trained on the mean
    cross-entropy of ``outputs`` (layer names of the unit whose outputs are scored and
    summed: ``segmentation``, ``enlarge`` (the coarse scale), ``stitch`` (the fine))."""

    def __init__(self, unit: keras.Model, outputs=("segmentation",), **kw):
        super().__init__({"unit": unit}, **kw)
        names = list(outputs)
        self.trained = keras.Model(unit.inputs, [unit.get_layer(n).output for n in names], name="train_" + unit.name)
        self.output_names = names
        self._compute = tf.function(self._gradients, reduce_retracing=True)

    def _feed(self, x0, x1):
        if len(self.models["unit"].inputs) == 1:
            return x0 if self.models["unit"].inputs[0].shape[1] == x0.shape[1] else x1
        return {"x0": x0, "x1": x1}

    def _gradients(self, x0, x1, y):
        unit = self.models["unit"]
        with tf.GradientTape() as tape:
            outs = self.trained(self._feed(x0, x1), training=True)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            losses = [tf.reduce_mean(masked_cross_entropy(o, y)) for o in outs]
            loss = tf.add_n(losses)
        return tape.gradient(loss, unit.trainable_variables), {"loss": loss, **{
            f"loss_{n}": v for n, v in zip(self.output_names, losses)}}

    def step(self, x0, x1, y, step: int) -> dict:
        grads, logs = self._compute(x0, x1, y)
        self._apply("unit", grads, step)
        return {k: float(v) for k, v in logs.items()}


# --------------------------------------------------------------------------------------
# Log and curves
# --------------------------------------------------------------------------------------
def _append_log(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = read_rows(path)
    keep = [r for r in rows if int(float(r["step"])) <= step]
    path.unlink()
    for r in keep:
        _append_log(path, r)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_log(path: Path) -> dict[str, list[float]]:
    """``log.csv`` as ``{column: values}``."""
    rows = read_rows(path) if Path(path).is_file() else []
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def plot_log(path: Path, out: Path) -> None:
    """One panel per logged quantity against the step."""
    from matplotlib.figure import Figure

    log = read_log(path)
    names = [k for k in log if k not in ("step", "learning_rate")]
    if not names:
        return
    fig = Figure(figsize=(3.2 * len(names), 3.0), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        ax.plot(log["step"], log[name], marker=".")
        ax.set_xlabel("step")
        ax.set_title(name)
    replace_atomically(out, lambda p: fig.savefig(p, dpi=90, format="png"))
